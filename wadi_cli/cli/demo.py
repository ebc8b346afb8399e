"""``wadi demo``: the whole WaDi story on the embedded tiny model (a thin shell over
:func:`wadi_cli.demo.run_demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from wadi_cli.cli.common import console, err_console, handle_errors, require

HELP = """Run the whole WaDi story on the embedded tiny model, offline, in minutes.

Distils the tiny teacher into one-step students (LoRaD; LoRA at a similar parameter
count; a full fine-tune), evaluates teacher and students, analyses what each student
changed (row norms vs directions, residual spectrum), swaps norms and directions between
the teacher and the full fine-tune, and writes DIR/report.md with the tables and plots,
DIR/metrics.json, the figures (after Fig. 1 of the paper) and every model it made.
Two students train at a time (one thread each); about 6 minutes on 2 CPU cores.

--quick trains only LoRaD and the full fine-tune (the swap needs it), 200 steps each,
and evaluates on 256 images: about 2 minutes on 2 free CPU cores.

Examples:

  wadi demo --out demo/

  wadi demo --out demo-quick/ --quick

  wadi demo --out demo/ --steps 800 --num-images 1000 --seed 1
"""


class _RichProgress:
    """Progress of the demo: one bar over all students' steps (with the time left), a bar per
    student (its real step, read from the workers while this process evaluates the teacher),
    a row for the teacher's evaluation, a row per later stage, one line per result."""

    def __init__(self, console: Any = None) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from wadi_cli.cli.progress import CountColumn, EtaColumn

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            CountColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            EtaColumn(),
            console=console or err_console,
        )
        self.tasks: dict[str, Any] = {}
        self.steps: dict[str, int] = {}
        self.overall: Any = None
        self.current: Any = None
        self.side: Any = None

    def __enter__(self) -> _RichProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish_stage()
        self.progress.__exit__(*exc)

    def _finish_stage(self) -> None:
        if self.current is not None:
            self.progress.update(self.current, completed=1, total=1)
            self.current = None

    def stage(self, text: str) -> None:
        self._finish_stage()
        # no total: a pulsing bar while the stage runs, full when the next one starts
        self.current = self.progress.add_task(text, total=None, info="")

    def training(self, names: list[str], steps: int) -> None:
        # the stage's row becomes the bar over every student's steps (its ETA is the training's)
        self.overall, self.current = self.current, None
        if self.overall is None:
            self.overall = self.progress.add_task("distilling", total=None, info="")
        self.progress.update(self.overall, total=steps * len(names), completed=0, counted=True, eta=True)
        for name in names:
            self.steps[name] = 0
            self.tasks[name] = self.progress.add_task(
                f"  train {name}", total=steps, info="waiting for a free core", counted=True, eta=True
            )

    def train_step(self, name: str, step: int, loss_g: float, loss_fake: float) -> None:
        self.steps[name] = step
        self.progress.update(
            self.tasks[name], completed=step, info=f"L_G {loss_g:.3g}  L_fake {loss_fake:.3g}"
        )
        self.progress.update(self.overall, completed=sum(self.steps.values()))

    def train_state(self, name: str, text: str) -> None:
        if text.startswith("done"):
            self.progress.stop_task(self.tasks[name])  # the elapsed time stops at the student's end
        self.progress.update(self.tasks[name], info=text)

    def side_job(self, text: str, seconds: float | None = None) -> None:
        if seconds is None:
            self.side = self.progress.add_task(f"  {text}", total=None, info="")
        else:
            self.progress.update(self.side, total=1, completed=1, info=f"done in {seconds:.0f} s")

    def result(self, text: str) -> None:
        self.progress.console.print(f"  {text}")


def register(app: typer.Typer) -> None:
    @app.command("demo", help=HELP)
    @handle_errors
    def demo(
        out: Annotated[
            Path | None,
            typer.Option(
                "--out",
                "-o",
                help="Output folder (report.md, metrics.json, …); required.",
                show_default=False,
            ),
        ] = None,
        quick: Annotated[
            bool, typer.Option("--quick", help="LoRaD + full fine-tune only, 200 steps, 256 images.")
        ] = False,
        steps: Annotated[
            int | None, typer.Option("--steps", help="Distillation steps per student (400; quick 200).")
        ] = None,
        num_images: Annotated[
            int | None, typer.Option("--num-images", "-n", help="Images per evaluation (500; quick 256).")
        ] = None,
        teacher_steps: Annotated[int, typer.Option("--teacher-steps", help="Teacher sampling steps.")] = 25,
        seed: Annotated[int, typer.Option("--seed", help="Training and evaluation seed.")] = 0,
        jobs: Annotated[
            int | None, typer.Option("--jobs", help="Students trained at once (default: up to 2).")
        ] = None,
        grid_rows: Annotated[
            int | None, typer.Option("--grid-rows", help="Images per model in the comparison grid.")
        ] = None,
    ) -> None:
        from wadi_cli.demo import DemoOptions, run_demo

        out = require(out, "--out is missing: choose the folder for the report with --out demo/")
        options = DemoOptions(quick, steps, num_images, teacher_steps, seed, jobs)
        if grid_rows is not None:
            options.grid_rows = grid_rows
        options.resolved()  # bad values fail before anything starts
        with _RichProgress() as progress:
            metrics = run_demo(out, options, progress)
        s, fd_teacher = metrics["swap"], metrics["teacher"]["fd"]
        fd_lorad = metrics["students"]["lorad"]["fd"]
        console.print(
            f"[bold]{out}/report.md[/] written in {metrics['timings']['total_s']:.0f} s. "
            f"Teacher fd {fd_teacher:.2f}; LoRaD student fd {fd_lorad:.2f}; full fine-tune fd "
            f"{s['student_metrics']['fd']:.2f} → {s['teacher_norms']['fd']:.2f} with teacher norms, "
            f"{s['teacher_directions']['fd']:.2f} with teacher directions."
        )
