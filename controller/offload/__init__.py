"""Split inference on the controller side.

* ``worker`` – ``OffloadWorker``: serves the tail of a split model to devices over MQTT;
* ``tuning`` – the feedback rule that moves devices' offload thresholds (pure).
"""
