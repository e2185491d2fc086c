"""The log filter that masks an object-store token wherever it slipped in."""
import logging

import pytest

from libra_worker.logs import SecretFilter

# scripts/test runs these once, where HAProxy cannot run (scripts/without-haproxy).
pytestmark = pytest.mark.no_haproxy


def filtered(message, *args):
    record = logging.LogRecord("t", logging.INFO, __file__, 1, message, args, None)
    SecretFilter().filter(record)
    return record.getMessage()


def test_a_token_in_json_or_a_repr_is_masked():
    assert filtered('reply: {"hpcs_object_store_token": "s3cr\\"et", "a": 1}') == \
        'reply: {"hpcs_object_store_token": "*****", "a": 1}'
    assert filtered("%s", {"hpcs_object_store_token": "s3cret"}) == \
        "{'hpcs_object_store_token': \"*****\"}"


def test_text_that_only_names_the_field_is_left_alone():
    text = "loadBalancers: hpcs_object_store_token: must be a string"
    assert filtered(text) == text
