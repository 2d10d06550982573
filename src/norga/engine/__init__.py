"""The driver: the task loop, run directories, resume, evaluation, building a run, progress. Above the methods."""
