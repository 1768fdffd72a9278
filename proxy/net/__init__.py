"""Calls to addresses a client chose (an input video, a webhook target): public addresses only, bounded reads."""
