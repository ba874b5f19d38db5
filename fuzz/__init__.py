"""Coverage-guided fuzzing (atheris) of the entry points that take client bytes or raw model outputs."""
