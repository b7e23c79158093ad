"""The build service: the job queue (jobqueue), workers that run builds (worker, build), the triggers
and git hooks that queue them, the daily loop (loop: sync, push, publish, queue) and status."""
