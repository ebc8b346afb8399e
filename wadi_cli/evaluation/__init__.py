"""Evaluation of generated images under the COCO zero-shot protocol of the one-step
distillation papers (FID and KID by clean-fid, CLIP score by OpenCLIP, precision/recall
by torch-fidelity), resumable and split over processes, plus the watcher that scores the
checkpoints of a ``wadi distill`` run.

The libraries come with the eval extra (``pip install "wadi-cli[eval]"``); modules import
them inside functions, so the rest of wadi works without it. Entry points:
:func:`wadi_cli.evaluation.evaluate.evaluate_model`,
:func:`~wadi_cli.evaluation.evaluate.evaluate_folder`,
:func:`~wadi_cli.evaluation.evaluate.make_reference` and
:func:`wadi_cli.evaluation.watch.watch`; the protocol's settings are in
:mod:`wadi_cli.evaluation.protocol`.
"""
