"""wadi_cli.backbones"""
