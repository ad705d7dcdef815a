"""Quantizers and the methods built from them.

Stage functions (rotate, smooth, quantize weights/activations/states, reconstruct) share one shape:

    apply_<name>(model, online: dict, calib: Calibration | None, **params) -> dict

They change the model's weights in place and attach modules at its attachment points through
`mqtool.quant.attach`, recording in `online` (the manifest's `online` section) everything
`apply_online` must rebuild when the checkpoint is loaded again; the returned dict is the JSON
record for the manifest's `quant` section. `calib` holds statistics of the model as it is *before*
the stage. They never import the CLI and raise `MqtoolError` on bad parameters.
"""
