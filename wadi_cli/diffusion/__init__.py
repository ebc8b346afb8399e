"""wadi_cli.diffusion"""
