"""Delivering builds to clients: build ids, publishable builds, editions, history, retention
(docs/binhost.md). Imports publish and the core; never service, sync, chroot or click."""
