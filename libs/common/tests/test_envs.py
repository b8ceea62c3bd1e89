"""fabrik_common.envs: rules, the dotenv parser (every rule, with line numbers), the writer, the
cipher and key loading, and the encrypted store over a real NATS server."""

from __future__ import annotations

import stat
from pathlib import Path

import msgspec
import nats
import pytest

from fabrik_common import envs
from fabrik_common.envs import (
    DotenvError,
    EnvCipher,
    EnvCorruptError,
    EnvDecryptError,
    EnvKeyError,
    EnvKeyMissingError,
    diff_envs,
    encode_stored,
    ensure_key_file,
    format_dotenv,
    format_dotenv_value,
    generate_env_key,
    is_protected,
    is_reserved,
    key_problem,
    load_env_cipher,
    parse_dotenv,
    parse_dotenv_entries,
    read_env,
    value_problem,
    values_errors,
)
from fabrik_common.topology import ensure_topology


def problems(text: str) -> list[tuple[int, str]]:
    with pytest.raises(DotenvError) as info:
        parse_dotenv(text, source="x.env")
    return info.value.problems


# --------------------------------------------------------------------------------------------
# Rules


def test_protected_envs() -> None:
    assert all(is_protected(e) for e in ("prod", "production", "live"))
    assert not any(is_protected(e) for e in ("dev", "staging", "prod2", "Prod"))


def test_reserved_keys_any_case() -> None:
    assert is_reserved("FABRIK_TOKEN")
    assert is_reserved("smithers_x")
    assert is_reserved("Fabrik_")
    assert not is_reserved("MY_FABRIK_TOKEN")
    assert key_problem("FABRIK_X") == envs.RESERVED_RULE


@pytest.mark.parametrize("key", ["", "1A", "A-B", "A B", "A.B", "é", "A" * 257])
def test_invalid_keys(key: str) -> None:
    assert key_problem(key) == envs.KEY_RULE


@pytest.mark.parametrize("key", ["A", "_", "a1", "DATABASE_URL", "_x_9", "A" * 256])
def test_valid_keys(key: str) -> None:
    assert key_problem(key) is None


def test_value_rules() -> None:
    assert value_problem("x") is None
    assert value_problem("") is None
    assert value_problem(1) == "must be a string, not a number"
    assert value_problem(None) == "must be a string, not null"
    assert value_problem("a\x00b") is not None
    assert value_problem("é" * 3, max_value_bytes=5) == "must be at most 5 bytes (UTF-8), not 6"


def test_values_errors_names_every_field() -> None:
    errors = values_errors({"OK": "1", "FABRIK_X": "1", "bad-key": "1", "N": 5}, field="values")
    assert [f for f, _ in errors] == ["values.FABRIK_X", "values.bad-key", "values.N"]


def test_diff_key_names_only() -> None:
    diff = diff_envs({"A": "1", "B": "2", "C": "3"}, {"B": "2", "C": "x", "D": "4"})
    assert (diff.added, diff.removed, diff.changed, diff.unchanged) == (["A"], ["D"], ["C"], ["B"])
    assert not diff.empty
    assert diff_envs({"A": "1"}, {"A": "1"}).empty


# --------------------------------------------------------------------------------------------
# Dotenv parser


def test_basic_comments_blank_lines_and_export() -> None:
    text = "# a comment\n\nA=1\nexport B=two\n  export\tC = three  \n   # indented comment\n"
    assert parse_dotenv(text) == {"A": "1", "B": "two", "C": "three"}


def test_entries_carry_line_numbers() -> None:
    entries = parse_dotenv_entries("\n# c\nA=1\n\nB='x\ny'\nC=3\n")
    assert [(e.key, e.line) for e in entries] == [("A", 3), ("B", 5), ("C", 7)]


def test_unquoted_values_are_trimmed_and_cut_at_a_comment() -> None:
    text = "A=  spaced out  \nB=value # comment\nC=no#comment\nD=\nE=a=b=c\nF=$HOME\nG=it's\n"
    assert parse_dotenv(text) == {
        "A": "spaced out",
        "B": "value",
        "C": "no#comment",
        "D": "",
        "E": "a=b=c",
        "F": "$HOME",  # no expansion
        "G": "it's",
    }


def test_single_quotes_are_literal() -> None:
    text = "A='  keep  '\nB='a\\nb'\nC='# not a comment' # a comment\nD='$HOME \"x\"'\nE=''\n"
    assert parse_dotenv(text) == {
        "A": "  keep  ",
        "B": "a\\nb",
        "C": "# not a comment",
        "D": '$HOME "x"',
        "E": "",
    }


def test_double_quotes_with_escapes() -> None:
    text = 'A="line1\\nline2"\nB="tab\\there"\nC="quote \\" and backslash \\\\"\nD="\\$HOME"\nE="\\d kept"\n'
    assert parse_dotenv(text) == {
        "A": "line1\nline2",
        "B": "tab\there",
        "C": 'quote " and backslash \\',
        "D": "$HOME",
        "E": "\\d kept",
    }


def test_quoted_values_may_span_lines() -> None:
    text = "KEY=\"-----BEGIN-----\nabc\n-----END-----\"\nNEXT=1\nS='a\nb'\n"
    assert parse_dotenv(text) == {"KEY": "-----BEGIN-----\nabc\n-----END-----", "NEXT": "1", "S": "a\nb"}


def test_crlf_line_endings() -> None:
    assert parse_dotenv("A=1\r\nB='x'\r\n") == {"A": "1", "B": "x"}


def test_line_without_equals_is_rejected_with_its_line_number() -> None:
    assert problems("A=1\n\nJUSTAKEY\n") == [(3, "expected KEY=VALUE, found no '=' in 'JUSTAKEY'")]


def test_duplicate_keys_are_rejected_with_both_line_numbers() -> None:
    assert problems("A=1\nB=2\nexport A=3\n") == [(3, "A is set twice: already on line 1")]


def test_invalid_key_is_rejected_with_its_line_number() -> None:
    (line, message), *_ = problems("OK=1\nBAD-KEY=2\n")
    assert line == 2
    assert message.startswith("'BAD-KEY' is not a valid variable name")


def test_unterminated_quote_names_the_line_it_opens_on() -> None:
    assert problems('A=1\nB="never closed\nC=3\n') == [
        (2, "unterminated double quote (the value starts on this line)")
    ]
    assert problems("A='open\n") == [(1, "unterminated single quote (the value starts on this line)")]


def test_text_after_the_closing_quote_is_rejected() -> None:
    assert problems("A='x' y\n") == [(1, "unexpected text after the closing quote: 'y'")]


def test_every_bad_line_is_reported_at_once() -> None:
    found = problems("A=1\nnope\nA=2\n1X=3\nexport\n")
    assert [line for line, _ in found] == [2, 3, 4, 5]
    error = DotenvError("f.env", found)
    assert str(error).splitlines()[0] == "f.env:2: expected KEY=VALUE, found no '=' in 'nope'"


def test_a_multiline_value_after_a_bad_key_does_not_break_the_following_lines() -> None:
    found = problems('1BAD="a\nB=not a key line\n"\nC=1\n')
    assert [line for line, _ in found] == [1]


def test_reserved_keys_parse_the_caller_decides() -> None:
    assert parse_dotenv("FABRIK_X=1\n") == {"FABRIK_X": "1"}


# --------------------------------------------------------------------------------------------
# Dotenv writer


@pytest.mark.parametrize(
    "value",
    [
        "",
        "plain",
        "postgres://u:p@h:5432/db?sslmode=require",
        "  spaces  ",
        "# hash",
        "a # b",
        "it's",
        'say "hi"',
        "both ' and \"",
        "multi\nline\r\nvalue",
        "tab\there",
        "$HOME ${X} \\n literal",
        "back\\slash",
        "ünïcode ✓",
        "=",
        "'",
        '"',
    ],
)
def test_written_values_read_back_unchanged(value: str) -> None:
    text = format_dotenv({"K": value, "NEXT": "1"})
    assert parse_dotenv(text) == {"K": value, "NEXT": "1"}


def test_format_dotenv_header_and_plain_values() -> None:
    assert format_dotenv({"A": "1", "B": "x y"}, header=["pulled"]) == "# pulled\nA=1\nB='x y'\n"
    assert format_dotenv({}) == ""
    assert format_dotenv_value("abc") == "abc"


# --------------------------------------------------------------------------------------------
# Cipher and keys


def test_cipher_round_trip_and_rotation() -> None:
    old, new = generate_env_key(), generate_env_key()
    token = EnvCipher.from_text(old).encrypt("secret")
    assert "secret" not in token
    rotated = EnvCipher.from_text(f"{new},{old}")
    assert rotated.decrypt(token) == "secret"
    assert rotated.key_id == envs.key_fingerprint(new.encode())
    with pytest.raises(EnvDecryptError):
        EnvCipher.from_text(new).decrypt(token)


def test_bad_keys_are_named_without_the_key() -> None:
    with pytest.raises(EnvKeyError, match="FABRIK_ENV_ENCRYPTION_KEY is not a Fernet key") as info:
        EnvCipher.from_text("not-a-key")
    assert "not-a-key" not in str(info.value)
    with pytest.raises(EnvKeyError, match="key 2 of"):
        EnvCipher.from_text(generate_env_key() + ",short")


def test_load_env_cipher_from_value_or_file(tmp_path: Path) -> None:
    assert load_env_cipher() is None
    key = generate_env_key()
    assert load_env_cipher(value=key) is not None
    path = tmp_path / "k"
    path.write_text(key + "\n")
    cipher = load_env_cipher(file=str(path))
    assert cipher is not None
    assert cipher.key_id == envs.key_fingerprint(key.encode())
    with pytest.raises(EnvKeyError, match="not both"):
        load_env_cipher(value=key, file=str(path))
    with pytest.raises(EnvKeyError, match="cannot be read"):
        load_env_cipher(file=str(tmp_path / "missing"))


def test_ensure_key_file_creates_a_private_key_once(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "env.key"
    assert ensure_key_file(path)
    first = path.read_text()
    assert not ensure_key_file(path)
    assert path.read_text() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_env_cipher(file=str(path)) is not None


# --------------------------------------------------------------------------------------------
# The store, over a real NATS


async def test_store_round_trip_encrypted_at_rest(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        cipher = EnvCipher.from_text(generate_env_key())
        kv = await envs.envs_kv(js)
        assert await read_env(js, "demo", "dev", cipher) == {}
        assert not await envs.envs_in_use(js)
        await envs.require_key_if_used(js, None, "test")  # nothing stored: no key needed

        raw = encode_stored({"DB": "postgres://secret"}, cipher, updated_by="alice", revision=1)
        await kv.create("demo.dev", raw)
        assert b"postgres://secret" not in raw
        stored = msgspec.json.decode(raw)
        assert set(stored) == {"format", "values", "updated_at", "updated_by", "revision", "key_id"}

        assert await read_env(js, "demo", "dev", cipher) == {"DB": "postgres://secret"}
        with pytest.raises(EnvKeyMissingError, match="FABRIK_ENV_ENCRYPTION_KEY"):
            await read_env(js, "demo", "dev", None)
        with pytest.raises(EnvDecryptError, match="demo/dev"):
            await read_env(js, "demo", "dev", generate_env_key())
        with pytest.raises(EnvKeyMissingError):
            await envs.require_key_if_used(js, None, "executor")

        listed = await envs.list_envs(kv, "demo")
        assert [(e.env, e.keys, e.updated_by, e.revision) for e in listed] == [("dev", ["DB"], "alice", 1)]
        assert listed[0].values == {}

        await kv.put("demo.bad", b"{not json")
        with pytest.raises(EnvCorruptError):
            await read_env(js, "demo", "bad", cipher)
        assert [e.env for e in await envs.list_envs(kv, "demo")] == ["dev"]

        await kv.delete("demo.dev")
        assert await read_env(js, "demo", "dev", None) == {}
    finally:
        await nc.close()
