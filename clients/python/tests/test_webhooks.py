"""Standard Webhooks signatures (CONTRACT.md "Webhooks"), offline."""

from __future__ import annotations

import pytest

from post_client.webhooks import InvalidSignature, sign, verify

# The example of the Standard Webhooks specification.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
STAMP = 1614265330
BODY = b'{"test": 2432232314}'
SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def headers(signature: str = SIGNATURE, stamp: int = STAMP) -> dict[str, str]:
    return {"webhook-id": MSG_ID, "webhook-timestamp": str(stamp), "webhook-signature": signature}


def test_the_specifications_example_signs_and_verifies() -> None:
    assert sign(SECRET, MSG_ID, STAMP, BODY) == SIGNATURE
    assert verify(SECRET, headers(), BODY, now=STAMP + 10) == MSG_ID


def test_one_of_several_signatures_may_match_and_headers_are_case_blind() -> None:
    both = f"v1,bm90IGl0 {SIGNATURE}"
    upper = {k.title(): v for k, v in headers(both).items()}
    assert verify(SECRET, upper, BODY, now=STAMP) == MSG_ID


@pytest.mark.parametrize(
    ("hdrs", "body", "now"),
    [
        (headers(), BODY + b" ", STAMP),  # body changed
        (headers("v1,AAAA"), BODY, STAMP),  # wrong signature
        (headers(), BODY, STAMP + 301),  # too old: a replay
        (headers(), BODY, STAMP - 301),  # from the future
        ({"webhook-id": MSG_ID}, BODY, STAMP),  # headers missing
        (headers(stamp="soon"), BODY, STAMP),  # type: ignore[arg-type]
    ],
)
def test_anything_else_is_refused(hdrs: dict[str, str], body: bytes, now: int) -> None:
    with pytest.raises(InvalidSignature):
        verify(SECRET, hdrs, body, now=now)


def test_a_secret_is_whsec_base64() -> None:
    with pytest.raises(ValueError):
        sign("not-a-secret", MSG_ID, STAMP, BODY)
