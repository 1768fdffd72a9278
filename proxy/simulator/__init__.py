"""A Pixazo simulator: the upstream's paths, statuses, webhooks and errors, with real MP4s, for tests and local runs."""
