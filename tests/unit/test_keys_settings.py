"""schemas/keys.py and schemas/settings.py: key hashing, provider-key encryption, config loading."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.keys import KEY_PREFIX, KeyMaterialError, KeyRing, display_prefix, generate_virtual_key
from schemas.settings import Secret, Settings, SettingsError, load_settings

MASTER_A = "a-master-secret-of-32-characters"
MASTER_B = "another-master-secret-32-chars!!"

RING_A = KeyRing(Secret(MASTER_A))
RING_B = KeyRing(Secret(MASTER_B))

keys = st.text(min_size=1, max_size=80)


# --- KeyRing hashing -------------------------------------------------------------------------


@given(key=keys)
def test_hash_is_stable_for_one_master_secret(key: str) -> None:
    # A fresh ring from the same secret (another process) must find the same key.
    assert RING_A.hash_key(key) == KeyRing(Secret(MASTER_A)).hash_key(key)


@given(key=keys)
def test_hash_differs_across_master_secrets(key: str) -> None:
    assert RING_A.hash_key(key) != RING_B.hash_key(key)


@given(a=keys, b=keys)
def test_distinct_keys_hash_differently(a: str, b: str) -> None:
    if a != b:
        assert RING_A.hash_key(a) != RING_A.hash_key(b)


def test_hash_is_lowercase_hex_sha256_and_not_the_key() -> None:
    key = generate_virtual_key()
    digest = RING_A.hash_key(key)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert key not in digest


# --- key format --------------------------------------------------------------------------------


def test_generated_key_format() -> None:
    key = generate_virtual_key()
    assert key.startswith(KEY_PREFIX)
    assert KEY_PREFIX == "sk-alph-"
    body = key[len(KEY_PREFIX):]
    assert len(body) == 43  # 32 random bytes, url-safe base64 without padding
    assert re.fullmatch(r"[A-Za-z0-9_-]+", body)


def test_generated_keys_are_unique() -> None:
    assert len({generate_virtual_key() for _ in range(200)}) == 200


def test_display_prefix_shows_prefix_plus_four_chars() -> None:
    key = KEY_PREFIX + "AbCdEfGhIjKl"
    assert display_prefix(key) == "sk-alph-AbCd"


@given(st.builds(generate_virtual_key))
def test_display_prefix_is_a_short_prefix_of_the_key(key: str) -> None:
    shown = display_prefix(key)
    assert key.startswith(shown)
    assert len(shown) == len(KEY_PREFIX) + 4
    assert len(key) - len(shown) >= 39  # almost all of the secret stays hidden


# --- provider-key encryption -----------------------------------------------------------------


@given(plaintext=st.text(max_size=200))
def test_encrypt_decrypt_round_trip(plaintext: str) -> None:
    ciphertext = RING_A.encrypt(plaintext)
    decrypted = RING_A.decrypt(ciphertext)
    assert isinstance(decrypted, Secret)
    assert decrypted.reveal() == plaintext


def test_ciphertext_does_not_contain_the_plaintext() -> None:
    plaintext = "sk-proj-" + "Q" * 40
    assert "Q" * 8 not in RING_A.encrypt(plaintext)


def test_decrypt_with_another_ring_from_the_same_secret() -> None:
    ciphertext = RING_A.encrypt("sk-provider-123")
    assert KeyRing(Secret(MASTER_A)).decrypt(ciphertext).reveal() == "sk-provider-123"


def test_decrypt_with_another_secret_raises_key_material_error() -> None:
    ciphertext = RING_A.encrypt("sk-provider-123")
    with pytest.raises(KeyMaterialError) as info:
        RING_B.decrypt(ciphertext)
    assert "sk-provider-123" not in str(info.value)


def test_decrypt_garbage_raises_key_material_error() -> None:
    with pytest.raises(KeyMaterialError):
        RING_A.decrypt("not-a-fernet-token")


def test_encryption_is_randomized() -> None:
    assert RING_A.encrypt("same") != RING_A.encrypt("same")


@pytest.mark.parametrize("master", ["", "short", "x" * 15])
def test_short_master_secret_is_rejected(master: str) -> None:
    with pytest.raises(KeyMaterialError, match="ALEPHANT_SECRET_KEY"):
        KeyRing(Secret(master))


def test_sixteen_character_master_secret_is_accepted() -> None:
    KeyRing(Secret("x" * 16)).hash_key("k")


def test_key_material_error_is_a_value_error() -> None:
    assert issubclass(KeyMaterialError, ValueError)


def test_keyring_repr_hides_secrets() -> None:
    text = repr(RING_A) + str(RING_A)
    assert MASTER_A not in text
    assert "***" in text
    assert not hasattr(RING_A, "__dict__")  # nothing beyond the derived keys is kept


# --- Secret ------------------------------------------------------------------------------------


@given(value=st.text(min_size=4, max_size=50).filter(lambda v: v not in "Secret('***')"))
def test_secret_repr_and_str_hide_the_value(value: str) -> None:
    secret = Secret(value)
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret])):
        assert value not in shown
        assert "***" in shown
    assert secret.reveal() == value


def test_secret_equality_and_truthiness() -> None:
    assert Secret("abc") == Secret("abc")
    assert Secret("abc") != Secret("abd")
    assert Secret("abc") != "abc"
    assert hash(Secret("abc")) == hash(Secret("abc"))
    assert Secret("abc")
    assert not Secret("")


# --- load_settings -----------------------------------------------------------------------------


def test_defaults_with_empty_environment() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.port == 8080
    assert not settings.secret_key


def test_parses_typed_values_from_the_environment() -> None:
    settings = load_settings({
        "ALEPHANT_PORT": "9001",
        "ALEPHANT_UPSTREAM_TIMEOUT_S": "12.5",
        "ALEPHANT_NATS_URL": "nats://example:4222",
        "ALEPHANT_STREAM_REPLICAS": "3",
        "UNRELATED": "ignored",
        "ALEPHANT_NOT_A_FIELD": "ignored",
    })
    assert settings.port == 9001
    assert isinstance(settings.port, int)
    assert settings.upstream_timeout_s == 12.5
    assert settings.nats_url == "nats://example:4222"
    assert settings.stream_replicas == 3


def test_overrides_win_over_environment() -> None:
    settings = load_settings({"ALEPHANT_PORT": "9001"}, port=9002)
    assert settings.port == 9002


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("ALEPHANT_PORT", "abc"),
        ("ALEPHANT_PORT", ""),
        ("ALEPHANT_ADMIN_PORT", "80.5x"),
        ("ALEPHANT_UPSTREAM_TIMEOUT_S", "soon"),
        ("ALEPHANT_EVENT_BATCH_MAX", "many"),
    ],
)
def test_bad_value_names_the_variable(var: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({var: value})
    message = str(info.value)
    assert var in message
    assert "<class" not in message  # the expected type is named for a human
    assert isinstance(info.value, ValueError)


def test_bad_int_message_names_the_expected_type() -> None:
    with pytest.raises(SettingsError, match=r"ALEPHANT_PORT='abc' is not a valid int"):
        load_settings({"ALEPHANT_PORT": "abc"})


def test_secrets_are_wrapped_and_hidden() -> None:
    settings = load_settings({
        "ALEPHANT_SECRET_KEY": "super-secret-master-key",
        "ALEPHANT_ADMIN_TOKEN": "admin-token-value",
    })
    assert isinstance(settings.secret_key, Secret)
    assert isinstance(settings.admin_token, Secret)
    assert settings.secret_key.reveal() == "super-secret-master-key"
    assert settings.admin_token.reveal() == "admin-token-value"
    shown = repr(settings) + str(settings)
    assert "super-secret-master-key" not in shown
    assert "admin-token-value" not in shown
