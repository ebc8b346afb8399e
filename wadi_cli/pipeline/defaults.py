"""Defaults of the downstream sampling options (no imports: read by the flag declarations
without torch, and by the settings that resolve them)."""

#: ``--strength`` when ``--init-image`` is given without it: t = round(0.6 · 999) = 599.
STRENGTH = 0.6
#: ``--refine-strength`` when ``--upscale`` is given without it: the refining step starts at
#: t = round(0.3 · 999) = 300, late enough to keep the native image's layout (docs/sampling.md,
#: "High resolution"; analysis/downstream_tiny/).
REFINE_STRENGTH = 0.3
#: ``--control-scale`` when ``--controlnet`` is given without it (diffusers' default).
CONTROL_SCALE = 1.0
