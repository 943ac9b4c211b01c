"""The local web UI: `qwen-image-ui` (or `python -m musubi_tuner.ui`). A FastAPI server (server.py) over a project
folder (project.py: settings, dataset, commands) and a queue of runs of the real scripts (runs.py); the page is plain
HTML and JavaScript (static/)."""
