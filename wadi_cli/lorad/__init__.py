"""wadi_cli.lorad"""
