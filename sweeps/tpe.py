"""``tuner: tpe``: Optuna's TPE sampler behind Keras Tuner's ``Oracle`` API.

Keras Tuner's Bayesian oracle draws 3 x (number of hyperparameters) random points before its Gaussian process
starts, more than a sweep of 8 to 16 trials has. Optuna's TPE (multivariate, over the groups of hyperparameters
that occur together, so that a conditional space asks only its active ones) learns from a few trials.

The oracle's own trials are the one record of the search: every new trial rebuilds an in-memory Optuna study
from them (finished trials with their score, failed ones as FAIL, running ones as RUNNING for the constant liar,
so that parallel workers are not handed the same point) and asks it for the next point, with a sampler seeded
from the sweep's seed and the number of trials so far. So the search survives a ``kill -9`` through Keras
Tuner's saved trials alone: a restarted sweep draws what the uninterrupted one would have drawn, and there is
no second store to keep in step with the first.

Values are asked in Keras Tuner's terms: a choice or boolean as an Optuna categorical, a number as its
cumulative probability in [0, 1] under the hyperparameter's own sampling (``value_to_prob``/``prob_to_value``,
as the Bayesian oracle encodes it), so log and reverse-log ranges and steps all come out as Keras Tuner draws
them. A value outside the space (a default off its range) is left out of the study's record of that trial.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras_tuner as kt
import numpy as np
import optuna
from keras_tuner.engine import hyperparameters as hp_module
from keras_tuner.engine.trial import TrialStatus

# Random points (the default point included) before TPE models the trials: TPE needs a few finished ones to split
# into good and bad; Optuna's own default of 10 would leave a sweep of 8 trials a random search.
STARTUP_TRIALS = 4
optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per trial added to the rebuilt studies


class TPEOracle(kt.Oracle):
    """A Keras Tuner oracle whose trials are drawn by Optuna's TPE sampler (ask and tell, see the module's doc)."""

    def __init__(self, objective: Any = None, max_trials: int = 10, seed: int | None = None,
                 startup_trials: int = STARTUP_TRIALS, **kwargs: Any):
        super().__init__(objective=objective, max_trials=max_trials, seed=seed, **kwargs)
        self.startup_trials = startup_trials

    def populate_space(self, trial_id: str) -> dict[str, Any]:
        study = self._study()
        for attempt in range(self._max_collisions):
            study.sampler = self._sampler(attempt)
            asked = study.ask()
            values = self._ask(asked)
            if not self._duplicate(values):
                return {"status": TrialStatus.RUNNING, "values": values}
            # Asked again: it stays RUNNING in this study, so that the constant liar steers the next ask away from it.
        values = self._random_values()  # TPE keeps proposing points already tried: a fresh random one, if any
        if values is None:
            return {"status": TrialStatus.STOPPED, "values": None}
        return {"status": TrialStatus.RUNNING, "values": values}

    def _sampler(self, attempt: int) -> optuna.samplers.TPESampler:
        """The sampler for this ask: seeded from the sweep's seed, the trials so far and the attempt, so that a
        resumed search asks what the uninterrupted one would have."""
        seed = int(np.random.SeedSequence([int(self.seed), len(self.trials), attempt]).generate_state(1)[0])
        with warnings.catch_warnings():  # group=True is "experimental" in Optuna: said once per trial otherwise
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(n_startup_trials=self.startup_trials, seed=seed, multivariate=True,
                                              group=True, constant_liar=True)

    def _study(self) -> optuna.Study:
        """An in-memory study holding the oracle's trials in the order they started."""
        direction = "maximize" if self.objective.direction == "max" else "minimize"
        study = optuna.create_study(direction=direction, sampler=optuna.samplers.RandomSampler())  # set per ask
        for trial_id in self.start_order:
            trial = self.trials.get(trial_id)
            if trial is None:
                continue
            params, distributions = self._encoded(trial.hyperparameters)
            if trial.status == TrialStatus.COMPLETED and trial.score is not None:
                state, value = optuna.trial.TrialState.COMPLETE, float(trial.score)
            elif trial.status == TrialStatus.FAILED:
                state, value = optuna.trial.TrialState.FAIL, None
            else:  # RUNNING, or INVALID and waiting for its retry: running as far as the next ask is concerned
                state, value = optuna.trial.TrialState.RUNNING, None
            study.add_trial(optuna.trial.create_trial(state=state, value=value, params=params,
                                                      distributions=distributions))
        return study

    def _ask(self, asked: optuna.Trial) -> dict[str, Any]:
        """The active values of the space for one trial, in order, so that a condition sees the values it depends
        on (as Keras Tuner's own ``_random_values``): fixed ones as they are, the others asked of ``asked``."""
        hps = hp_module.HyperParameters()
        for hp in self.hyperparameters.space:
            hps.merge([hp])
            if not hps.is_active(hp):
                continue
            if isinstance(hp, hp_module.Fixed):
                value = hp.value
            elif _categorical(hp):
                value = asked.suggest_categorical(hp.name, list(hp.values))
            else:
                value = hp.prob_to_value(asked.suggest_float(hp.name, 0.0, 1.0))
            hps.values[hp.name] = value
        return hps.values

    def _encoded(self, hps: kt.HyperParameters) -> tuple[dict[str, Any], dict[str, Any]]:
        """A trial's active values as Optuna params and distributions (``_ask``'s encoding); a value outside the
        space (off a range, not among the choices) is left out."""
        params, distributions = {}, {}
        for hp in self.hyperparameters.space:
            if isinstance(hp, hp_module.Fixed) or hp.name not in hps.values or not hps.is_active(hp):
                continue
            value = hps.values[hp.name]
            if _categorical(hp):
                choices = list(hp.values)
                if value in choices:
                    params[hp.name] = choices[choices.index(value)]
                    distributions[hp.name] = optuna.distributions.CategoricalDistribution(choices)
                continue
            try:
                inside = hp.min_value <= value <= hp.max_value
                prob = float(hp.value_to_prob(value)) if inside else -1.0
            except (TypeError, ValueError, ZeroDivisionError):  # not a number, or one log sampling cannot take
                continue
            if 0.0 <= prob <= 1.0:
                params[hp.name] = prob
                distributions[hp.name] = optuna.distributions.FloatDistribution(0.0, 1.0)
        return params, distributions


def _categorical(hp: hp_module.HyperParameter) -> bool:
    return isinstance(hp, (hp_module.Choice, hp_module.Boolean))
