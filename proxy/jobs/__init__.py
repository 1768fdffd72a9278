"""What follows a job after its submit: the upstream client, tracking, refresh, settling, sweeping, the local queue's
dispatcher, webhooks, alerts and local media copies."""
