"""Pure aggregation: no torch, no web code, no I/O; explicit state in and out.

A :class:`Strategy` (built from a spec by :func:`parse_strategy`) is a frozen
configuration; ``init`` returns a :class:`ServerState` and each round's
``aggregate`` (or, for streaming strategies, ``aggregate_sum``) takes a state
and returns the next one. Nothing a strategy is given is ever changed.

==================  =======================  ============================================  =========
spec                paper                    defaults                                      needs_all
==================  =======================  ============================================  =========
fedavg              McMahan et al. 2017      server_lr=1.0                                 no
fedavgm             Hsu et al. 2019          server_lr=1.0, server_momentum=0.9            no
fedadam             Reddi et al. 2021        server_lr=0.01, beta1=0.9, beta2=0.99,        no
                                             tau=1e-3
fedyogi             Reddi et al. 2021        as fedadam                                    no
fedadagrad          Reddi et al. 2021        server_lr=0.01, beta1=0.9, tau=1e-3           no
fedprox             Li et al. 2020           prox_mu=0.01, server_lr=1.0                   no
scaffold            Karimireddy et al. 2020  server_lr=1.0, plain means                    yes
median              Yin et al. 2018          server_lr=1.0; n >= 1                         yes
trimmed-mean:BETA   Yin et al. 2018          server_lr=1.0; n >= 1, 0 <= BETA < 0.5        yes
krum:F              Blanchard et al. 2017    server_lr=1.0; n >= 2F+3                      yes
multi-krum:F:M      Blanchard et al. 2017    server_lr=1.0; n >= 2F+3, 1 <= M <= n         yes
bulyan:F            El Mhamdi et al. 2018    server_lr=1.0; n >= 4F+3                      yes
norm-bounding       Sun et al. 2019          clip_norm required, server_lr=1.0             yes
RULE+OPT            -                        RULE's needs, OPT's defaults                  yes
==================  =======================  ============================================  =========

``RULE`` is one of the robust rules above and ``OPT`` one of ``fedavg``,
``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad``, ``fedprox``
(``trimmed-mean:0.2+fedadam``, ``median+fedavgm``). ``clip_norm`` bounds every
client delta's L2 norm before the rule of any strategy; any strategy with it
set needs all updates. ``needs_all`` False means the engine may fold each
delta into one :class:`~fedlearn.weights.RunningSum` (memory: one model);
True means it buffers the round's K updates (memory: K deltas). The same rows
are :data:`STRATEGY_TABLE`; :mod:`fedlearn.strategies.server_opt` says where
the defaults come from.

Integer arrays (BatchNorm's ``num_batches_tracked``, 0-d included) never go
through clipping, robust rules or server optimizers: every strategy moves them
by the example-weighted mean of the clients' integer deltas, rounded to the
nearest integer (:func:`~fedlearn.strategies.base.integer_mean`).
"""

from fedlearn.strategies.base import ServerState, Update, state_from_arrays, state_to_arrays
from fedlearn.strategies.robust import AggregationRule, NotEnoughUpdatesError, Rule
from fedlearn.strategies.sampling import poisson_sample, sample_clients
from fedlearn.strategies.spec import (
    STRATEGIES,
    STRATEGY_TABLE,
    StrategyRow,
    parse_strategy,
    spec_options,
)
from fedlearn.strategies.strategy import ClippedSum, Strategy

__all__ = [
    "STRATEGIES",
    "STRATEGY_TABLE",
    "AggregationRule",
    "ClippedSum",
    "NotEnoughUpdatesError",
    "Rule",
    "ServerState",
    "Strategy",
    "StrategyRow",
    "Update",
    "parse_strategy",
    "poisson_sample",
    "sample_clients",
    "spec_options",
    "state_from_arrays",
    "state_to_arrays",
]
