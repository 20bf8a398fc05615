from rlhfkit.cli import console

console()
