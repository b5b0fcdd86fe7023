import numpy as np
import pytest

from memory_store import (
    DimensionError,
    InvalidInputError,
    InvalidNameError,
    NonFiniteError,
    TextError,
    Trace,
)
from memory_store.codec import decode_header, decode_record, encode_record
from memory_store.records import validate


def _v(t, **kw):
    return validate(t, max_text_chars=kw.get("maxc", 100), latent_dim=kw.get("ld"),
                    text_dim=kw.get("td"))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int64, np.bool_, np.uint8])
def test_codec_roundtrip(dtype):
    lv = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)
    t = _v(Trace("ns", "s1", "héllo ✓", step=3, latent_value=lv, meta={"x": [1, "y"]},
                 recorded_at=1.5))
    t.id = 42
    back = decode_record(42, encode_record(t, [40, 41]))
    assert back.latent_value.dtype == lv.dtype and back.latent_value.shape == lv.shape
    np.testing.assert_array_equal(back.latent_value, lv)
    assert (back.text, back.step, back.meta, back.recorded_at) == ("héllo ✓", 3, {"x": [1, "y"]},
                                                                1.5)
    assert decode_header(encode_record(t, [40, 41]))["cx"] == [40, 41]


def test_json_roundtrip():
    t = Trace("ns", "s", "x", latent_key=np.ones(3, np.float32),
              latent_value=np.zeros((2, 2), np.float16), id=5)
    back = Trace.from_json(t.to_json())
    np.testing.assert_array_equal(back.latent_key, t.latent_key)
    assert back.latent_value.dtype == np.float16 and back.id == 5


@pytest.mark.parametrize("trace,err", [
    (Trace("ns", "s", ""), TextError),
    (Trace("ns", "s", "   "), TextError),
    (Trace("ns", "s", "x" * 101), TextError),
    (Trace("ns", "s", 5), TextError),
    (Trace("", "s", "x"), InvalidNameError),
    (Trace("a/b", "s", "x"), InvalidNameError),
    (Trace("ns", "s\x00", "x"), InvalidNameError),
    (Trace("ns", "s" * 200, "x"), InvalidNameError),
    (Trace("ns", "s", "x", latent_key=np.ones(3)), DimensionError),
    (Trace("ns", "s", "x", latent_key=np.ones((2, 4))), DimensionError),
    (Trace("ns", "s", "x", latent_key=np.array([1, np.nan, 0, 0])), NonFiniteError),
    (Trace("ns", "s", "x", latent_key=np.array([1, np.inf, 0, 0])), NonFiniteError),
    (Trace("ns", "s", "x", latent_value=np.array([np.nan])), NonFiniteError),
    (Trace("ns", "s", "x", latent_value=np.array(["a"])), InvalidInputError),
    (Trace("ns", "s", "x", meta={"f": object()}), InvalidInputError),
    (Trace("ns", "s", "x", step="3"), InvalidInputError),
    (Trace("ns", "s", "x", id=-1), InvalidInputError),
])
def test_validation_errors(trace, err):
    with pytest.raises(err):
        _v(trace, ld=4)


def test_validate_does_not_modify_input():
    key = [1.0, 2.0, 3.0, 4.0]
    t = Trace("ns", "s", "x", latent_key=key)
    v = _v(t, ld=4)
    assert t.latent_key is key and v.latent_key.dtype == np.float32
