"""wadi_cli.analysis"""
