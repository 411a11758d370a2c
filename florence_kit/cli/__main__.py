"""``python -m florence_kit.cli``: also what ``accelerate launch -m`` / ``torchrun -m`` start in each process."""

from florence_kit.cli import main

main()
