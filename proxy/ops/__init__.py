"""Operations: how the gateway runs, stops and is watched, apart from what it does."""
