"""QLoRADDPStrategy's own choices (its training is tested on real gloo ranks in ``tests/e2e/test_ddp.py``)."""

import pytest

from lit_llama_lab.train.ddp import QLoRADDPStrategy


def test_wrapper_options_that_would_do_nothing_are_refused_but_defaults_pass():
    with pytest.raises(ValueError, match=r"does not wrap the model.*\['static_graph'\]"):
        QLoRADDPStrategy(static_graph=True)
    strategy = QLoRADDPStrategy(static_graph=False, find_unused_parameters=False, ddp_comm_hook=None)
    assert strategy.token_weighted
    assert not QLoRADDPStrategy(token_weighted=False).token_weighted
