"""pixazo-proxy: a caching, budget-enforcing gateway in front of Pixazo's Grok Imagine Video API."""

__version__ = "0.1.0"
