"""HTTP: the upstream's routes, the admin API, the OpenAPI document, errors as responses, the server and its middleware."""
