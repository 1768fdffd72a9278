"""The gateway's rules, free of HTTP, the request pipeline, the store and the jobs: money, prices, budgets, the
catalog, validation, queueing and cache rules, errors, status bodies, header parsing."""
