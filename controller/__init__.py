"""edgefleet's controller: the fleet service (``fleetctl serve``) and the ``fleetctl`` CLI.

Grouped by capability; each package's ``__init__`` names its modules.

* ``config``    – ``ControllerConfig`` / ``load_config``: one typed, frozen config;
* ``db``        – the one place that opens the SQLite file (pragmas, schema, transactions);
* ``registry``  – ``Registry``: devices, telemetry, events, results (its own SQL);
* ``channel``   – ``ControlChannel``: build, sign and send what devices act on;
* ``link``      – ``make_link``: the controller's MQTT connections;
* ``service``   – ``ControllerService``: ingestion, composing the runners with narrow deps;
* ``client``    – ``FleetClient``: the CLI's request/response and live views;
* ``fl``        – federated learning (aggregate, strategies, privacy, selection, engine, store, runner);
* ``rollouts``  – model rollouts (policy, store, runner);
* ``offload``   – split inference (worker, tuning);
* ``cli``       – the click command tree (``main`` is the ``fleetctl`` console script);
* ``broker``, ``certs``, ``table``, ``modeltools`` – embedded broker, TLS PKI, text tables, model tooling.
"""
