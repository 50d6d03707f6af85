"""Webhooks without servers: the Standard Webhooks signature (checked by the reference
verifier, the `standardwebhooks` package), the back-off, the endpoint check, the sealed secret."""

from __future__ import annotations

import base64
import json
import random
import time

import pytest
from cryptography.exceptions import InvalidTag
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from shared import webhooks

BODY = json.dumps(
    {"specversion": "1.0", "id": "e-1", "type": "ReferralCreated", "data": {"referral_id": "r1"}}
).encode()


def test_the_reference_verifier_accepts_our_signature() -> None:
    secret = webhooks.new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    now = int(time.time())
    headers = webhooks.signed_headers(secret, "e-1", now, BODY)
    assert headers["content-type"] == "application/cloudevents+json"
    assert headers["webhook-id"] == "e-1" and headers["webhook-timestamp"] == str(now)
    assert Webhook(secret).verify(BODY, headers) == json.loads(BODY)


@pytest.mark.parametrize(
    "change",
    [
        lambda h, b: (h, b.replace(b"r1", b"r2")),  # another body
        lambda h, b: ({**h, "webhook-id": "e-2"}, b),  # another event's id
        lambda h, b: ({**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}, b),
    ],
)
def test_the_reference_verifier_refuses_what_was_changed(change) -> None:  # type: ignore[no-untyped-def]
    secret = webhooks.new_secret()
    headers, body = change(webhooks.signed_headers(secret, "e-1", int(time.time()), BODY), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, headers)


def test_another_secret_does_not_verify() -> None:
    headers = webhooks.signed_headers(webhooks.new_secret(), "e-1", int(time.time()), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(webhooks.new_secret()).verify(BODY, headers)


def test_the_signature_is_the_specifications_hmac() -> None:
    # The Standard Webhooks specification's own example (its README): secret, id, timestamp,
    # payload and the signature it gives.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert (
        webhooks.signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_retries_start_near_one_second_grow_and_stay_within_five_minutes() -> None:
    rng = random.Random(7)
    delays = [webhooks.retry_delay(n, rng) for n in range(1, 40)]
    assert 0.5 <= delays[0] <= 1.0
    assert delays[5] > 4 * delays[1]  # growing
    assert all(d + webhooks.ATTEMPT_TIMEOUT <= 300 for d in delays)
    assert max(delays) > 200  # and it does reach minutes


@pytest.mark.parametrize(
    ("url", "embedded", "ok"),
    [
        ("https://engine.example.org/post/hook?k=1", False, True),
        ("https://engine.example.org:8443/", True, True),
        ("http://127.0.0.1:9000/hook", True, True),
        ("http://127.0.0.1:9000/hook", False, False),
        ("http://127.0.0.1/hook", True, False),  # a port is part of the promise
        ("http://engine.example.org/hook", True, False),
        ("http://10.0.0.5:9000/hook", True, False),
        ("https://user:pw@engine.example.org/", False, False),
        ("ftp://engine.example.org/", False, False),
        ("https:///nohost", False, False),
        ("not a url", False, False),
    ],
)
def test_endpoints(url: str, embedded: bool, ok: bool) -> None:
    assert (webhooks.check_url(url, embedded=embedded) is None) is ok


def test_the_embedded_default_is_a_platform_on_loopback() -> None:
    local = "postgresql://postgres@127.0.0.1:5432/post"
    assert webhooks.embedded_default(["nats://127.0.0.1:4222"], local)
    assert webhooks.embedded_default(["nats://localhost:4222"], local)
    assert not webhooks.embedded_default(["tls://nats-1:4222", "tls://nats-2:4222"], local)
    assert not webhooks.embedded_default(["nats://127.0.0.1:4222"], "postgresql://u@db:5432/post")


def test_the_endpoint_label_drops_path_and_query() -> None:
    assert webhooks.endpoint_label("https://e.example.org:8443/a/b?token=x") == (
        "https://e.example.org:8443"
    )


def test_a_sealed_secret_opens_only_with_its_key_and_hospital(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv(webhooks.KEY_VARIABLE, raising=False)
    key = webhooks.sealing_key(tmp_path)
    assert (tmp_path / webhooks.KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert webhooks.sealing_key(tmp_path) == key  # made once
    secret = webhooks.new_secret()
    sealed = webhooks.seal(key, "h1", secret)
    assert secret.encode() not in sealed and secret[6:].encode() not in sealed
    assert webhooks.unseal(key, "h1", sealed) == secret
    with pytest.raises(InvalidTag):
        webhooks.unseal(key, "h2", sealed)  # another hospital's row
    other = base64.b64encode(bytes(32)).decode()
    monkeypatch.setenv(webhooks.KEY_VARIABLE, other)
    with pytest.raises(InvalidTag):
        webhooks.unseal(webhooks.sealing_key(tmp_path), "h1", sealed)


def test_a_key_that_is_not_32_bytes_of_base64_is_named(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for bad in ("change-me-base64-of-32-bytes", base64.b64encode(bytes(16)).decode()):
        monkeypatch.setenv(webhooks.KEY_VARIABLE, bad)
        with pytest.raises(ValueError, match="POST_WEBHOOK_KEY must be the base64 of 32 bytes"):
            webhooks.sealing_key(tmp_path)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["st-mary", "--url", "http://engine.example.org/secret-path"], "give an https URL"),
        (["st-mary", "--url", "https://u:pw@engine.example.org/"], "credentials in the URL"),
        (
            ["st-mary", "--url", "https://engine.example.org/", "--off"],
            "--url <https-url> or --off",
        ),
        (["st-mary"], "--url <https-url> or --off"),
        (["St Mary", "--off"], "a hospital id is a slug"),
    ],
)
def test_postctl_hospital_webhook_refuses_with_a_reason_and_echoes_nothing(
    argv: list[str],
    says: str,
    monkeypatch,
    capsys,  # type: ignore[no-untyped-def]
) -> None:
    from postctl.cli import main

    for name in ("POST_NATS_URL", "POST_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["hospital", "webhook", *argv])
    message = str(stopped.value)
    assert says in message
    assert "secret-path" not in message and "pw" not in message.replace("postctl", "")
    assert capsys.readouterr().out == ""  # no secret was printed: nothing was registered
