"""Evaluation: perplexity, and zero-shot tasks through lm-eval.

Where lm-eval is installed, importing this package registers the mqtool model in lm-eval's
registry as "mqtool" (``lm_eval.simple_evaluate(model="mqtool", model_args="pretrained=DIR")``).
Without lm-eval, or with one that does not import, nothing is registered and the rest of the
package works; ``mqtool zeroshot`` then says how to install it.
"""

from importlib.util import find_spec

from mqtool.errors import MqtoolError

if find_spec("lm_eval") is not None:
    try:
        from mqtool.evaluate import lm_eval_adapter  # noqa: F401  (registers "mqtool")
    except MqtoolError:
        pass  # the adapter's message is raised again where zero-shot evaluation is asked for
