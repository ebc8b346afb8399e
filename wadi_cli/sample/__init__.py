"""``wadi sample``'s own work: read the prompts, sample through :mod:`wadi_cli.pipeline`, and
write numbered PNGs, a grid and ``samples.json`` into a folder that appears atomically."""

from wadi_cli.sample.output import check_output_dir, default_output_dir, image_grid, save_samples
from wadi_cli.sample.run import read_prompts, sample_to_folder

__all__ = [
    "check_output_dir",
    "default_output_dir",
    "image_grid",
    "read_prompts",
    "sample_to_folder",
    "save_samples",
]
