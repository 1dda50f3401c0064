"""Bad input everywhere (hypothesis): the campaign loader, CSV import and every webhook parser never crash (no
500, no traceback), never write half of a request, and every rejection says what was wrong."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import yaml
from click.testing import CliRunner
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outreach.cli import main
from outreach.domain.campaigns import load_campaign_file
from outreach.service.runtime import Runtime
from tests.helpers import INBOUND_TOKEN, PUBLIC_URL, Signer
from tests.security.util import table_counts
from tests.web.test_inbound_parse import form
from tests.web.test_webhooks import EVENTS_PATH, fixture_form

ROOT = Path(__file__).resolve().parents[2]
SEED = (ROOT / "campaigns" / "jd_intro.yaml").read_text(encoding="utf-8")

FUZZ = settings(
    max_examples=int(os.environ.get("OUTREACH_FUZZ_EXAMPLES", "120")),
    deadline=None,
    derandomize=True,  # the same examples on every run, so CI is stable; raise OUTREACH_FUZZ_EXAMPLES to dig deeper
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Values that have broken parsers before: empties, NUL and control characters, huge numbers, YAML specials.
NASTY = st.sampled_from(
    [
        "", " ", "\x00", "a\x00b", "\r\n", "\t", "\u2028", "\ufeff", "null", "~", "true", "no", "[]", "{}",
        "-1", "0", "1e309", "NaN", "9" * 40, "2d", "-3d", "99999999999999d", "25:00", "24:00", "0x10",
        "&a [*a, *a]", "*nothing", "!!python/object/apply:os.system ['true']", "!!binary AAAA", "'unterminated",
        "{{ candidate.__class__ }}", "<script>", "é" * 300, "x" * 5000, "Asia/Nowhere", "+86 138 0013 8000",
        "not-an-email", "a@b", "@", "zh-CN", "xx-YY", "stack:python", "UPPER:Case", "a;b|c",
    ]
)  # fmt: skip
TEXT = st.one_of(NASTY, st.text(max_size=40), st.text(alphabet=string.printable, max_size=40))
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


# inputs tried and how each was answered, per test: printed when the module ends (pytest -s shows them)
COUNTS: dict[str, dict[str, int]] = {}


def tally(test: str, outcome: str) -> None:
    per_test = COUNTS.setdefault(test, {})
    per_test[outcome] = per_test.get(outcome, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Any:
    yield
    for test, outcomes in COUNTS.items():
        crashes = outcomes.get("500", 0)
        print(f"{test}: {sum(outcomes.values())} inputs fuzzed, {crashes} crashes/500s, answers {outcomes}")


def assert_problems_are_clear(problems: list[Any]) -> None:
    for problem in problems:
        assert problem.field and problem.field.strip(), problem
        assert problem.message and problem.message.strip(), problem
        assert problem.line is None or (isinstance(problem.line, int) and problem.line >= 1), problem


# -- campaign YAML -------------------------------------------------------------------------------------------


def mutate_lines(text: str, edits: list[tuple[int, str, bool]]) -> str:
    lines = text.splitlines()
    for index, replacement, keep_key in edits:
        if not lines:
            break
        i = index % len(lines)
        key, colon, _ = lines[i].partition(":")
        lines[i] = f"{key}: {replacement}" if keep_key and colon else replacement
    return "\n".join(lines) + "\n"


CAMPAIGN_KEYS = ["name", "category", "trigger", "steps", "exit_on", "description", "track_clicks", "unless_clicked"]
EDITS = st.tuples(st.integers(0, 200), TEXT, st.booleans())


@FUZZ
@given(
    source=st.one_of(
        st.builds(mutate_lines, st.just(SEED), st.lists(EDITS, max_size=4)),
        st.builds(lambda d: yaml.safe_dump(d, allow_unicode=True), st.dictionaries(TEXT, JSONISH, max_size=6)),
        st.builds(
            lambda extra: yaml.safe_dump({**yaml.safe_load(SEED), **extra}, allow_unicode=True),
            st.dictionaries(st.sampled_from(CAMPAIGN_KEYS), JSONISH, max_size=3),
        ),
        TEXT,
    )
)
def test_campaign_loader_never_crashes_and_names_the_field(
    tmp_path_factory: pytest.TempPathFactory, source: str
) -> None:
    path = tmp_path_factory.mktemp("campaigns") / "jd_intro.yaml"
    path.write_text(source, encoding="utf-8", errors="surrogatepass")
    campaign, problems = load_campaign_file(path)
    tally("campaign loader", "valid" if campaign is not None else "problems")
    assert (campaign is None) == bool(problems)
    assert_problems_are_clear(problems)


@pytest.mark.parametrize(
    "source",
    [
        "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "name: jd_intro\nsteps: *i\n",
        "[" * 5000 + "]" * 5000,
        "{" * 5000 + "}" * 5000,
        "name: jd_intro\nsteps:\n" + "  - " * 2000 + "x\n",
        "\x00\x01\x02",
        "name: !!python/object/apply:os.system ['touch pwned']\n",
    ],
    ids=["billion laughs", "deep list", "deep mapping", "deep steps", "control bytes", "python tag"],
)  # fmt: skip
def test_campaign_loader_survives_yaml_bombs(tmp_path: Path, source: str) -> None:
    path = tmp_path / "jd_intro.yaml"
    path.write_text(source, encoding="utf-8")
    campaign, problems = load_campaign_file(path)
    assert campaign is None and problems
    assert_problems_are_clear(problems)
    assert not (tmp_path / "pwned").exists()


# -- CSV import ----------------------------------------------------------------------------------------------

COLUMNS = ["external_id", "name", "email", "phone", "locale", "timezone", "source", "tags", "nurture_consent"]
GOOD = {
    "external_id": st.from_regex(r"[a-z]{1,3}-[0-9]{1,4}", fullmatch=True),
    "name": st.sampled_from(["Alex Morgan", "张伟", "O'Brien, Pat"]),
    "email": st.sampled_from(["alex@example.org", "zw@example.cn", ""]),
    "phone": st.sampled_from(["+8613800138000", "13800138000", ""]),
    "locale": st.sampled_from(["en", "zh-CN", ""]),
    "timezone": st.sampled_from(["Asia/Shanghai", "Europe/London", ""]),
    "source": st.sampled_from(["linkedin", ""]),
    "tags": st.sampled_from(["stack:python", "a;b|c", ""]),
    "nurture_consent": st.sampled_from(["yes", "no", ""]),
}


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    shuffled = st.lists(st.sampled_from([*COLUMNS, "bogus"]), min_size=1, max_size=10)
    header = draw(st.one_of(st.just(COLUMNS), st.permutations(COLUMNS), shuffled))
    rows = []
    for _ in range(draw(st.integers(0, 5))):
        good_or_bad = [st.one_of(GOOD.get(column, TEXT), TEXT) if draw(st.booleans()) else GOOD.get(column, TEXT)
                       for column in header]  # fmt: skip
        rows.append([draw(strategy) for strategy in good_or_bad])

    def cell(value: str) -> str:
        return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n\r') else value

    text = "\n".join(",".join(cell(v) for v in row) for row in [header, *rows])
    raw = text.encode("utf-8", errors="surrogatepass")
    return draw(st.one_of(st.just(raw), st.just(raw + b"\n\xff\xfe\x00"), st.binary(max_size=64)))


@pytest.fixture
def csv_env(database_url: str) -> dict[str, str]:
    base = {k: "" for k in os.environ if k.startswith(("OUTREACH_", "SENDGRID_", "TWILIO_"))}
    return {**base, "OUTREACH_DATABASE_URL": database_url, "OUTREACH_LOG_LEVEL": "WARNING"}


@FUZZ
@given(content=csv_files())
def test_csv_import_is_all_or_nothing_and_names_the_line(
    csv_env: dict[str, str], runtime: Runtime, tmp_path_factory: pytest.TempPathFactory, content: bytes
) -> None:
    path = tmp_path_factory.mktemp("csv") / "people.csv"
    path.write_bytes(content)
    before = table_counts(runtime)["candidates"]
    result = CliRunner().invoke(main, ["candidates", "import", str(path)], env=csv_env)
    after = table_counts(runtime)["candidates"]
    tally("csv import", "500" if result.exit_code not in (0, 1) or not isinstance(
        result.exception, SystemExit | None) else f"exit {result.exit_code}")  # fmt: skip
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 1), result.output
    if result.exit_code == 1:
        assert after == before, "a refused file wrote rows"
        assert ("Error:" in result.output and str(path) in result.output) or "invalid row" in result.output
        for line in result.output.splitlines():
            if line.startswith(str(path) + ":") and "invalid" not in line:
                number, field = line[len(str(path)) + 1 :].split(": ", 2)[:2]
                assert number.isdigit() and field, line


# -- webhooks ------------------------------------------------------------------------------------------------


EVENT_KEYS = [
    "email",
    "timestamp",
    "event",
    "category",
    "sg_event_id",
    "sg_message_id",
    "outreach_id",
    "reason",
    "status",
    "type",
    "response",
    "url",
    "useragent",
    "ip",
    "asm_group_id",
    "bounce_classification",
]
EVENT_NAMES = ["processed", "delivered", "deferred", "bounce", "dropped", "open", "click", "spamreport",
               "unsubscribe", "group_unsubscribe", "group_resubscribe", "blocked", "whatever"]  # fmt: skip


@st.composite
def sendgrid_batches(draw: st.DrawFn) -> bytes:
    events: list[Any] = []
    for _ in range(draw(st.integers(0, 4))):
        event: dict[str, Any] = {
            "email": draw(st.one_of(st.just("c-1@example.org"), TEXT)),
            "timestamp": draw(st.one_of(st.integers(0, 2**40), st.floats(), TEXT, st.none())),
            "event": draw(st.one_of(st.sampled_from(EVENT_NAMES), TEXT)),
            "sg_event_id": draw(st.one_of(st.from_regex(r"[A-Za-z0-9]{4,22}", fullmatch=True), TEXT)),
            "sg_message_id": draw(TEXT),
        }
        event.update(draw(st.dictionaries(st.sampled_from(EVENT_KEYS) | TEXT, JSONISH, max_size=4)))
        events.append(draw(st.one_of(st.just(event), JSONISH)) if draw(st.integers(0, 9)) == 0 else event)
    payload: Any = draw(st.one_of(st.just(events), JSONISH)) if draw(st.integers(0, 9)) == 0 else events
    return json.dumps(payload, ensure_ascii=draw(st.booleans())).encode("utf-8", errors="surrogatepass")


@FUZZ
@given(body=sendgrid_batches())
def test_sendgrid_event_parser(runtime: Runtime, client: TestClient, signer: Signer, body: bytes) -> None:
    before = table_counts(runtime)
    answer = client.post(EVENTS_PATH, content=body, headers=signer.headers(body))
    tally("sendgrid events", str(answer.status_code))
    assert answer.status_code in (200, 400), (answer.status_code, answer.text)
    if answer.status_code == 400:
        assert answer.json()["message"], answer.text
        assert table_counts(runtime) == before, "a refused batch wrote rows"


def twilio_post(client: TestClient, path: str, params: list[tuple[str, str]]) -> Any:
    from tests.security.test_webhook_attacks import twilio_signed

    signature = twilio_signed(PUBLIC_URL + path, params)
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature}
    return client.post(path, content=urlencode(params).encode(), headers=headers)


STATUS_KEYS = ["MessageSid", "SmsSid", "MessageStatus", "SmsStatus", "ErrorCode", "ErrorMessage", "To", "From",
               "AccountSid", "ApiVersion", "RawDlrDoneDate", "Body", "NumSegments"]  # fmt: skip


@FUZZ
@given(
    base=st.sampled_from(["status_callback_delivered.form", "status_callback_undelivered.form", "inbound_sms.form"]),
    changes=st.lists(st.tuples(st.sampled_from(STATUS_KEYS) | TEXT, TEXT), max_size=5),
    drop=st.lists(st.sampled_from(STATUS_KEYS), max_size=3),
    outreach_id=st.one_of(st.none(), TEXT),
    route=st.sampled_from(["status", "inbound"]),
)
def test_twilio_parsers(
    runtime: Runtime,
    client: TestClient,
    base: str,
    changes: list[tuple[str, str]],
    drop: list[str],
    outreach_id: str | None,
    route: str,
) -> None:
    params = [(k, v) for k, v in fixture_form(base).items() if k not in drop] + changes
    path = f"/webhooks/twilio/{route}"
    if route == "status" and outreach_id is not None:
        path += "?" + urlencode({"outreach_id": outreach_id})
    before = table_counts(runtime)
    answer = twilio_post(client, path, params)
    tally(f"twilio {route}", str(answer.status_code))
    assert answer.status_code in (200, 400), (answer.status_code, answer.text)
    if answer.status_code == 400:
        assert answer.json()["message"], answer.text
        assert table_counts(runtime) == before


INBOUND_FIELDS = ["headers", "text", "html", "from", "to", "cc", "subject", "envelope", "charsets", "SPF", "dkim",
                  "attachments", "email", "spam_score", "sender_ip", "attachment-info"]  # fmt: skip


FIELD_BYTES = st.one_of(st.binary(max_size=80), TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")))
CHARSETS = st.sampled_from(["utf-8", "gb2312", "x-bogus", "", "utf-7"])


@FUZZ
@given(
    parts=st.lists(st.tuples(st.sampled_from(INBOUND_FIELDS), FIELD_BYTES), max_size=8),
    envelope=st.one_of(st.none(), JSONISH.map(json.dumps)),
    charsets=st.one_of(
        st.none(), st.dictionaries(st.sampled_from(["text", "html", "subject", "from"]), CHARSETS).map(json.dumps)
    ),
)
def test_inbound_parse_parser(
    runtime: Runtime, client: TestClient, parts: list[tuple[str, bytes]], envelope: str | None,
    charsets: str | None,
) -> None:  # fmt: skip
    fields = list(parts)
    if envelope is not None:
        fields.append(("envelope", envelope.encode()))
    if charsets is not None:
        fields.append(("charsets", charsets.encode()))
    body = form(*fields)
    before = table_counts(runtime)
    answer = client.post(
        f"/webhooks/sendgrid/inbound?token={INBOUND_TOKEN}",
        content=body,
        headers={"Content-Type": "multipart/form-data; boundary=xYzZY"},
    )
    tally("inbound parse", str(answer.status_code))
    assert answer.status_code in (200, 400, 413), (answer.status_code, answer.text)
    if answer.status_code != 200:
        assert answer.json()["message"], answer.text
        assert table_counts(runtime) == before
