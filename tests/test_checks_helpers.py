"""The shared validators of minifast.checks (real_value, int_at_least) and the helpers made public beside them."""
import numpy as np
import pytest
import torch

from minifast import schedules
from minifast.checks import check_wd, int_at_least, real_value


@pytest.mark.parametrize('v, kw, expected', [
    (0.5, {}, 0.5), (3, {}, 3.0), (np.float32(0.25), {}, 0.25), (np.int64(2), dict(low=0), 2.0),
    (0, dict(low=0), 0.0), (1, dict(low=0, high=1), 1.0),
    (0.5, dict(low=0, high=1, low_open=True, high_open=True), 0.5),
    (torch.tensor(0.5), dict(coerce=True), 0.5), (np.array(2.), dict(low=0, coerce=True), 2.0)])
def test_real_value_returns_a_float(v, kw, expected):
    out = real_value(v, 'x', 'f', **kw)
    assert type(out) is float and out == expected


@pytest.mark.parametrize('v, kw, message', [
    (float('nan'), {}, 'f: x must be a finite number, got nan'),
    (float('inf'), dict(low=0), 'f: x must be a finite number, got inf'),
    (True, {}, 'f: x must be a finite number, got True'),
    ('1', {}, "f: x must be a finite number, got '1'"),
    (torch.tensor(0.5), {}, 'f: x must be a finite number, got tensor(0.5000)'),
    ('1', dict(coerce=True), "f: x must be a finite number, got '1'"),
    (-1, dict(low=0), 'f: x must be >= 0, got -1'),
    (0, dict(low=0, low_open=True), 'f: x must be > 0, got 0'),
    (1.5, dict(low=0, high=1), 'f: x must be <= 1, got 1.5'),
    (1, dict(high=1, high_open=True), 'f: x must be < 1, got 1'),
    (2e-5, dict(low=1e-4), 'f: x must be >= 0.0001, got 2e-05'),
    (-1, dict(low=0, message='whole message'), 'whole message'),
    (float('nan'), dict(message='whole message'), 'whole message')])
def test_real_value_names_the_first_failed_test(v, kw, message):
    with pytest.raises(ValueError) as e:
        real_value(v, 'x', 'f', **kw)
    assert str(e.value) == message


def test_int_at_least():
    assert int_at_least(3, 'n', 'f') == 3 and int_at_least(np.int64(0), 'n', 'f', low=0) == 0
    for v, low in ((0, 1), (2.0, 1), (True, 0), ('2', 1), (-1, 0)):
        with pytest.raises(ValueError) as e:
            int_at_least(v, 'n', 'f', low=low)
        assert str(e.value) == f'f: n must be an integer >= {low}, got {v!r}'


def test_check_wd_uses_the_shared_validator_and_keeps_its_message():
    assert check_wd([0.1, 0], 'fit') == [0.1, 0]
    with pytest.raises(ValueError) as e:
        check_wd([0.1, float('nan')], 'fit')
    assert str(e.value) == 'fit: wd must be a finite number >= 0 (or one per layer group), got [0.1, nan]'


def test_the_old_private_names_in_schedules_are_the_shared_validators():
    # minifast/callbacks/schedule.py still imports these two names from minifast.schedules
    assert schedules._int_at_least is int_at_least and schedules._real is real_value


def test_grid_plain_and_append_record_are_public(tmp_path):
    from minifast.grid import append_record, plain, read_log
    assert plain({'a': (1, np.float32(0.5)), 2: slice(None, 3), 'n': float('nan')}) == \
        {'a': [1, 0.5], '2': 'slice(None, 3)', 'n': None}
    log = tmp_path / 'runs.jsonl'
    log.write_text('{"cut": ')  # a record cut short by a kill: the next one starts on a line of its own
    append_record(log, {'x': 1})
    with pytest.warns(UserWarning, match='not valid JSON'):
        assert read_log(log) == [{'x': 1}]
