"""The redactor blanks every run of 8+ characters of the secret, whatever the text around it; its quick first look
(aligned windows of half a run) must never let a run through."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.domain.redact import REDACTED, Redactor


def reference(secret: str, text: str, run: int = 8) -> str:
    """Every position checked, no first look: what the redactor must equal."""
    run = min(run, len(secret))
    pieces = {secret[i:i + run] for i in range(len(secret) - run + 1)}
    covered = [False] * len(text)
    for start in range(len(text) - run + 1):
        if text[start:start + run] in pieces:
            covered[start:start + run] = [True] * run
    out, i = [], 0
    while i < len(text):
        if covered[i]:
            while i < len(text) and covered[i]:
                i += 1
            out.append(REDACTED)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


secrets = st.text(alphabet="abcdefXYZ0123456789-_", min_size=1, max_size=48)


@settings(max_examples=400, deadline=None)
@given(secret=secrets, noise=st.lists(st.text(alphabet="abcxyz 012./:", max_size=12), min_size=1, max_size=5),
       cuts=st.lists(st.tuples(st.integers(0, 47), st.integers(1, 48)), max_size=4))
def test_every_run_of_the_secret_is_blanked_as_a_full_scan_would(secret: str, noise: list[str],
                                                                 cuts: list[tuple[int, int]]) -> None:
    pieces = [secret[start:start + length] for start, length in cuts]
    text = "".join(part for pair in zip(noise, [*pieces, ""] * len(noise), strict=False) for part in pair)
    assert Redactor(secret).text(text) == reference(secret, text)


def test_a_whole_key_and_a_cut_one_are_blanked_and_plain_text_is_left() -> None:
    redactor = Redactor("k3y-0123456789abcdef")
    assert redactor.text("echo k3y-0123456789abcdef back") == f"echo {REDACTED} back"
    assert redactor.text("part 456789abc of it") == f"part {REDACTED} of it"
    assert redactor.text("a lighthouse at dusk, waves crashing") == "a lighthouse at dusk, waves crashing"
