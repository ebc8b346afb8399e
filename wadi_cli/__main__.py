"""``python -m wadi_cli`` runs the ``wadi`` CLI (also what ``accelerate launch -m wadi_cli`` uses)."""

from wadi_cli.cli.main import main

if __name__ == "__main__":
    main()
