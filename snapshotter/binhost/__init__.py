"""Delivering builds to clients: build ids, publishable builds, editions, history, retention, client
configuration and the update script, the PKI and the web server configuration (docs/binhost.md,
docs/tls.md). Imports only the core; a tag's snapshot files come from publish through
service.delivery. Never imports service, sync, publish, chroot or click."""
