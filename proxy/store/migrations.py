"""Versioned schema migrations, per backend. Entry ``n`` (1-based) takes the schema from version n-1 to n.

Append only: a released migration is never edited, a change is a new entry, in :data:`MIGRATIONS` (SQLite, here)
and :data:`~proxy.store.postgres_migrations.POSTGRES_MIGRATIONS` alike. The PostgreSQL list started later, so its
first entry is the whole schema as SQLite's seventh left it; the two keep their own version numbers.
"""

from __future__ import annotations

#: The per-day rollup (team, day, the period it counts in, model, resolution) summed from the ledger: what the
#: migrations backfill and ``pixazo-proxy rollup rebuild`` restores. Settled jobs, their seconds, what was charged
#: (every spent change: settlements and adjustments), cache hits and what they saved.
DAY_ROLLUP_FROM_LEDGER = """
    SELECT team, substr(at, 1, 10), period_key, COALESCE(model, ''), COALESCE(resolution, ''),
           SUM(CASE WHEN kind = 'settle' THEN 1 ELSE 0 END),
           SUM(CASE WHEN kind = 'settle' THEN COALESCE(seconds, 0) ELSE 0 END),
           SUM(spent_delta), SUM(CASE WHEN kind = 'saving' THEN 1 ELSE 0 END), SUM(saved_micros)
    FROM ledger WHERE kind IN ('settle', 'saving', 'adjust')
    GROUP BY team, substr(at, 1, 10), period_key, COALESCE(model, ''), COALESCE(resolution, '')
"""
DAY_ROLLUP_COLUMNS = "team, day, period_key, model, resolution, jobs, seconds, charged_micros, hits, saved_micros"
_DAY_ROLLUP_ROW = """(NEW.team, substr(NEW.at, 1, 10), NEW.period_key, COALESCE(NEW.model, ''), COALESCE(NEW.resolution, ''),
            CASE WHEN NEW.kind = 'settle' THEN 1 ELSE 0 END,
            CASE WHEN NEW.kind = 'settle' THEN COALESCE(NEW.seconds, 0) ELSE 0 END,
            NEW.spent_delta, CASE WHEN NEW.kind = 'saving' THEN 1 ELSE 0 END, NEW.saved_micros)"""


#: Ledger kinds a period may hold few of among many rows (not every job's reserve and settle): each has a partial
#: index of its own (one per kind: a planner proves ``kind = 'adjust'`` implies an index's ``kind = 'adjust'``,
#: not an IN list), so listing one is an index range, and the hot path's rows stay out of every one of them.
RARE_LEDGER_KINDS = ("release", "saving", "adjust", "topup")
RARE_KIND_INDEXES = "\n    ".join(f"CREATE INDEX ledger_{kind} ON ledger (team, period_key, id) WHERE kind = '{kind}';"
                                  for kind in RARE_LEDGER_KINDS)


def _console_tables(money: str, serial: str) -> str:
    return f"""
    CREATE TABLE day_rollup (
        team TEXT NOT NULL,
        day TEXT NOT NULL,
        period_key TEXT NOT NULL,
        model TEXT NOT NULL,
        resolution TEXT NOT NULL,
        jobs {money} NOT NULL DEFAULT 0,
        seconds {money} NOT NULL DEFAULT 0,
        charged_micros {money} NOT NULL DEFAULT 0,
        hits {money} NOT NULL DEFAULT 0,
        saved_micros {money} NOT NULL DEFAULT 0,
        PRIMARY KEY (team, day, period_key, model, resolution)
    );
    CREATE INDEX day_rollup_period ON day_rollup (team, period_key);
    INSERT INTO day_rollup ({DAY_ROLLUP_COLUMNS}) {DAY_ROLLUP_FROM_LEDGER};
    CREATE TABLE console_links (
        token_hash TEXT PRIMARY KEY,
        team TEXT NOT NULL,
        user_id TEXT NOT NULL,
        admin INTEGER NOT NULL,
        expires_at TEXT NOT NULL,
        used_at TEXT
    );
    CREATE INDEX console_links_expiry ON console_links (expires_at);
    CREATE TABLE console_sessions (
        id_hash TEXT PRIMARY KEY,
        team TEXT NOT NULL,
        user_id TEXT NOT NULL,
        admin INTEGER NOT NULL,
        csrf TEXT NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL
    );
    CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
    CREATE TABLE refusals (
        id {serial},
        team TEXT NOT NULL,
        user_id TEXT NOT NULL,
        at TEXT NOT NULL,
        model TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX refusals_team ON refusals (team, id);
    CREATE INDEX handles_created ON handles (created_at, id);
    {RARE_KIND_INDEXES}
    """


def _queue_tables(real: str) -> str:
    """The local queue's tables (in the backend's type for seconds since the epoch) and the columns it adds."""
    return f"""
    CREATE TABLE queued_jobs (
        job_id BIGINT PRIMARY KEY REFERENCES jobs (id),
        handle TEXT NOT NULL,
        team TEXT NOT NULL REFERENCES teams (name),
        user_id TEXT NOT NULL,
        model TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        enqueued_at {real} NOT NULL,
        deadline {real} NOT NULL
    );
    CREATE INDEX queued_jobs_order ON queued_jobs (team, priority DESC, job_id);
    CREATE INDEX queued_jobs_deadline ON queued_jobs (deadline);
    CREATE TABLE queue_teams (
        team TEXT PRIMARY KEY REFERENCES teams (name),
        pass BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE upstream_gate (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        in_flight INTEGER NOT NULL DEFAULT 0,
        queued INTEGER NOT NULL DEFAULT 0,
        next_send {real} NOT NULL DEFAULT 0,
        fair_clock BIGINT NOT NULL DEFAULT 0
    );
    INSERT INTO upstream_gate (id) VALUES (1);
    ALTER TABLE teams ADD COLUMN weight INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE teams ADD COLUMN on_limit TEXT NOT NULL DEFAULT 'queue';
    ALTER TABLE jobs ADD COLUMN holds_slot INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN sent_at TEXT;
    DROP INDEX jobs_live_fingerprint;
    CREATE UNIQUE INDEX jobs_live_fingerprint ON jobs (fingerprint)
        WHERE claims_fingerprint = 1 AND status IN ('SUBMITTING', 'QUEUED', 'PROCESSING', 'INDETERMINATE', 'WAITING');
    """

MIGRATIONS: list[str] = [
    # 1: teams, upstream jobs, client handles
    """
    CREATE TABLE teams (
        name TEXT PRIMARY KEY,
        budget_limit_micros INTEGER NOT NULL CHECK (budget_limit_micros >= 0),
        period TEXT NOT NULL CHECK (period IN ('month', 'week', 'day', 'total')),
        created_at TEXT NOT NULL
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        upstream_id TEXT UNIQUE,
        model TEXT NOT NULL,
        params TEXT NOT NULL,
        status TEXT NOT NULL,
        output TEXT,
        error TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        completed_at TEXT,
        checked_at REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_unfinished ON jobs (status)
        WHERE status IN ('SUBMITTING', 'QUEUED', 'PROCESSING');
    CREATE TABLE handles (
        id TEXT PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs (id),
        team TEXT NOT NULL REFERENCES teams (name),
        user_id TEXT NOT NULL,
        model TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX handles_team ON handles (team, created_at);
    CREATE INDEX handles_job ON handles (job_id);
    """,
    # 2: budgets. Running totals per scope and period change in the same
    # transaction as the append-only ledger, so spent = sum(spent_delta),
    # reserved = sum(reserved_delta) and credit = sum(credit_delta) always hold.
    """
    ALTER TABLE teams ADD COLUMN soft_threshold_percent INTEGER NOT NULL DEFAULT 80;
    ALTER TABLE teams ADD COLUMN user_cap_micros INTEGER;
    ALTER TABLE teams ADD COLUMN max_concurrent_jobs INTEGER;
    ALTER TABLE teams ADD COLUMN max_submits_per_minute INTEGER;
    ALTER TABLE teams ADD COLUMN updated_at TEXT;
    CREATE TABLE budget_totals (
        scope TEXT NOT NULL,
        period_key TEXT NOT NULL,
        spent_micros INTEGER NOT NULL DEFAULT 0,
        reserved_micros INTEGER NOT NULL DEFAULT 0 CHECK (reserved_micros >= 0),
        credit_micros INTEGER NOT NULL DEFAULT 0,
        soft_alerted INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (scope, period_key)
    );
    CREATE TABLE reservations (
        job_id INTEGER PRIMARY KEY REFERENCES jobs (id),
        handle TEXT NOT NULL,
        team TEXT NOT NULL,
        user_id TEXT NOT NULL,
        model TEXT NOT NULL,
        period_key TEXT NOT NULL,
        global_period_key TEXT NOT NULL,
        amount_micros INTEGER NOT NULL CHECK (amount_micros >= 0),
        seconds INTEGER NOT NULL,
        resolution TEXT NOT NULL,
        basis TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'settled', 'released')),
        created_at TEXT NOT NULL,
        resolved_at TEXT,
        note TEXT
    );
    CREATE INDEX reservations_open ON reservations (team, state);
    CREATE INDEX reservations_age ON reservations (state, created_at);
    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('reserve', 'settle', 'release', 'adjust', 'topup', 'saving')),
        team TEXT NOT NULL,
        user_id TEXT,
        handle TEXT,
        job_id INTEGER,
        model TEXT,
        seconds INTEGER,
        resolution TEXT,
        period_key TEXT NOT NULL,
        global_period_key TEXT NOT NULL,
        reserved_delta INTEGER NOT NULL DEFAULT 0,
        spent_delta INTEGER NOT NULL DEFAULT 0,
        credit_delta INTEGER NOT NULL DEFAULT 0,
        saved_micros INTEGER NOT NULL DEFAULT 0,
        basis TEXT,
        actor TEXT,
        note TEXT
    );
    CREATE INDEX ledger_team_period ON ledger (team, period_key, id);
    """,
    # 3: dedup, idempotency keys, webhooks. A job remembers its request's
    # fingerprint and when the gateway saw it end; a handle its webhook and how
    # it was answered; the outbox holds webhook deliveries written in the same
    # transaction as the status change they report.
    """
    ALTER TABLE jobs ADD COLUMN fingerprint TEXT;
    ALTER TABLE jobs ADD COLUMN finished_at TEXT;
    CREATE INDEX jobs_fingerprint ON jobs (fingerprint, id);
    ALTER TABLE handles ADD COLUMN cache TEXT NOT NULL DEFAULT 'MISS';
    ALTER TABLE handles ADD COLUMN webhook_url TEXT;
    ALTER TABLE handles ADD COLUMN webhook_mode TEXT;
    ALTER TABLE teams ADD COLUMN webhook_secret TEXT;
    CREATE TABLE idempotency_keys (
        team TEXT NOT NULL,
        user_id TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        handle TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        PRIMARY KEY (team, user_id, idempotency_key)
    );
    CREATE INDEX idempotency_expiry ON idempotency_keys (expires_at);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id TEXT NOT NULL UNIQUE,
        handle TEXT NOT NULL,
        team TEXT NOT NULL,
        url TEXT NOT NULL,
        status TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        last_error TEXT,
        created_at TEXT NOT NULL,
        finished_at TEXT
    );
    CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
    """,
    # 4: a handle's deliveries go out in order; finding the head of each handle's queue needs this
    """
    CREATE INDEX outbox_handle_order ON outbox (handle, state, id);
    """,
    # 5: no scans on hot paths. A cache hit looks up its job's settlement in the ledger; the tracker lists the
    # jobs running upstream, least recently checked first (the index's WHERE matches the query's exactly).
    """
    CREATE INDEX ledger_job ON ledger (job_id) WHERE job_id IS NOT NULL;
    CREATE INDEX jobs_running ON jobs (checked_at) WHERE status IN ('QUEUED', 'PROCESSING') AND upstream_id IS NOT NULL;
    """,
    # 6: /metrics reads running totals instead of summing the ledger and counting jobs on every scrape. Triggers
    # keep them in the transaction of the row they count, so they cannot drift; ledger_mismatches checks them.
    """
    CREATE TABLE spend_rollup (
        team TEXT NOT NULL,
        model TEXT NOT NULL,
        spent_micros INTEGER NOT NULL DEFAULT 0,
        saved_micros INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (team, model)
    );
    INSERT INTO spend_rollup (team, model, spent_micros, saved_micros)
        SELECT team, COALESCE(model, ''), SUM(CASE WHEN kind = 'settle' THEN spent_delta ELSE 0 END),
               SUM(CASE WHEN kind = 'saving' THEN saved_micros ELSE 0 END)
        FROM ledger WHERE kind IN ('settle', 'saving') GROUP BY team, COALESCE(model, '');
    CREATE TRIGGER ledger_rollup AFTER INSERT ON ledger WHEN new.kind IN ('settle', 'saving')
    BEGIN
        INSERT INTO spend_rollup (team, model, spent_micros, saved_micros)
            VALUES (new.team, COALESCE(new.model, ''), CASE WHEN new.kind = 'settle' THEN new.spent_delta ELSE 0 END,
                    CASE WHEN new.kind = 'saving' THEN new.saved_micros ELSE 0 END)
            ON CONFLICT (team, model) DO UPDATE SET spent_micros = spent_micros + excluded.spent_micros,
                                                    saved_micros = saved_micros + excluded.saved_micros;
    END;
    CREATE TABLE job_counts (
        model TEXT NOT NULL,
        status TEXT NOT NULL,
        jobs INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (model, status)
    );
    INSERT INTO job_counts (model, status, jobs) SELECT model, status, COUNT(*) FROM jobs GROUP BY model, status;
    CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs
    BEGIN
        INSERT INTO job_counts (model, status, jobs) VALUES (new.model, new.status, 1)
            ON CONFLICT (model, status) DO UPDATE SET jobs = jobs + 1;
    END;
    CREATE TRIGGER jobs_count_update AFTER UPDATE OF status ON jobs WHEN new.status IS NOT old.status
    BEGIN
        UPDATE job_counts SET jobs = jobs - 1 WHERE model = old.model AND status = old.status;
        INSERT INTO job_counts (model, status, jobs) VALUES (new.model, new.status, 1)
            ON CONFLICT (model, status) DO UPDATE SET jobs = jobs + 1;
    END;
    """,
    # 7: several processes on one database. A job's lease says who may ask the upstream about it until when (the
    # tracker's claim and a poll's refresh alike); the fingerprint a submit claims is unique among live jobs, so
    # identical submits racing on different processes send one; the outbox rows a sender has claimed; submit
    # times for per-minute limits; and named leases for work one process does at a time (the sweeper).
    """
    ALTER TABLE jobs ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN claims_fingerprint INTEGER NOT NULL DEFAULT 0;
    CREATE UNIQUE INDEX jobs_live_fingerprint ON jobs (fingerprint)
        WHERE claims_fingerprint = 1 AND status IN ('SUBMITTING', 'QUEUED', 'PROCESSING', 'INDETERMINATE');
    ALTER TABLE outbox ADD COLUMN claimed_until TEXT NOT NULL DEFAULT '';
    CREATE TABLE submit_times (
        team TEXT NOT NULL,
        dry_run INTEGER NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX submit_times_window ON submit_times (team, dry_run, at);
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        until REAL NOT NULL
    );
    """,
    # 8: the console. A per-day rollup of the ledger kept by a trigger in the ledger row's own transaction (charts,
    # reports and the overview read it instead of summing the ledger); one-time sign-in links and sessions (hashes
    # only); the last budget refusals per team.
    _console_tables("INTEGER", "INTEGER PRIMARY KEY AUTOINCREMENT") + f"""
    CREATE TRIGGER ledger_day_rollup AFTER INSERT ON ledger WHEN new.kind IN ('settle', 'saving', 'adjust')
    BEGIN
        INSERT INTO day_rollup ({DAY_ROLLUP_COLUMNS}) VALUES {_DAY_ROLLUP_ROW}
            ON CONFLICT (team, day, period_key, model, resolution) DO UPDATE SET
                jobs = jobs + excluded.jobs, seconds = seconds + excluded.seconds,
                charged_micros = charged_micros + excluded.charged_micros, hits = hits + excluded.hits,
                saved_micros = saved_micros + excluded.saved_micros;
    END;
    """,
    # 9: the local queue (proxy.queueing). Teams get a weight and what to do at their own limit; a waiting job has
    # a queue row; the gate row counts the upstream slots held (a job holds one from the moment it is sent until
    # it ends, released by trigger in the same transaction) and keeps the rate's schedule and the fair clock; a
    # WAITING job's fingerprint is live, so identical submits join it.
    _queue_tables("REAL") + """
    CREATE TRIGGER jobs_free_slot AFTER UPDATE OF status ON jobs
        WHEN old.holds_slot = 1 AND new.status IN ('COMPLETED', 'FAILED', 'ERROR', 'REJECTED', 'WAITING')
    BEGIN
        UPDATE upstream_gate SET in_flight = in_flight - 1 WHERE id = 1;
        UPDATE jobs SET holds_slot = 0 WHERE id = new.id;
    END;
    """,
]
