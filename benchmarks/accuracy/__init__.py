"""The accuracy experiment (the main job): tasks, experts, methods, run."""
