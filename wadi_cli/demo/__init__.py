"""``wadi demo``: distil, analyse and swap on the embedded tiny model, with a report."""

from wadi_cli.demo.run import DemoOptions, DemoProgress, run_demo
from wadi_cli.demo.students import STUDENTS, StudentSpec, train_students

__all__ = ["STUDENTS", "DemoOptions", "DemoProgress", "StudentSpec", "run_demo", "train_students"]
