"""The main job run locally (scripts/demo): Redis, a worker with SmolLM2-135M-Instruct, a scripted application."""
