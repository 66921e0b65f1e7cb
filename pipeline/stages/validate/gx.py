"""The Great Expectations side of `validate`: each frame's rules as a suite run on an ephemeral context, and
GX's own rendering of the results (Data Docs, with GX's default views)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import ValidateParams
from pipeline.stages.validate.rules import INDEX, RULES, Outcome

DOCS_DIR = "data_docs"  # Great Expectations' Data Docs, beside the validation page


class GxChecker:
    """A Great Expectations ephemeral context: one suite per frame, results rendered as Data Docs."""

    def __init__(self, docs_dir: Path) -> None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        # GX logs hundreds of INFO lines about its own set-up; only its warnings are worth showing.
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        import great_expectations as gx  # slow import (~3 s): only when the stage runs
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        site = {
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir.resolve()),
            },
        }
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
            data_docs_sites={"validate": site},
        )
        self._gx = gx
        self._context = gx.get_context(mode="ephemeral", project_config=config)
        self._source = self._context.data_sources.add_pandas("manifest")

    def check(self, name: str, frame: pd.DataFrame, settings: ValidateParams) -> dict[str, Outcome]:
        """Run the suite of the rules (not `off`) that check frame `name`; one outcome per rule."""
        severity = settings.severity
        rules = [
            rule for rule, spec in RULES.items() if spec.frame == name and getattr(severity, rule) != "off"
        ]
        if not rules:
            return {}
        definition = self._validation(name, rules, settings)
        index = INDEX[name]
        result_format = {
            "result_format": "COMPLETE",
            **({"unexpected_index_column_names": index} if index else {}),
        }
        result = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
        return {
            item.expectation_config.meta["rule"]: _outcome(item, frame, index, settings)
            for item in result.results
        }

    def _validation(self, name: str, rules: list[str], settings: ValidateParams) -> Any:
        """A validation definition of frame `name`: one expectation per rule, tagged with the rule's name."""
        gx = self._gx
        suite = self._context.suites.add(gx.ExpectationSuite(name=name))
        for rule in rules:
            spec = RULES[rule]
            bound = {spec.bound: spec.threshold(settings)}
            suite.add_expectation(
                gx.expectations.ExpectColumnValuesToBeBetween(
                    column=spec.column, **bound, meta={"rule": rule}
                )
            )
        batch = self._source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        definition = gx.ValidationDefinition(name=name, data=batch, suite=suite)
        return self._context.validation_definitions.add(definition)

    def build_docs(self) -> None:
        """Render every suite run so far into the Data Docs folder."""
        self._context.build_data_docs()


def _outcome(item: Any, frame: pd.DataFrame, index: list[str], settings: ValidateParams) -> Outcome:
    """One rule's outcome from its GX result: passed or not, the column's worst value, the offenders' keys."""
    rule = item.expectation_config.meta["rule"]
    if item.exception_info.get("raised_exception"):
        raise RuntimeError(f"Great Expectations could not evaluate rule {rule}: {item.exception_info}")
    spec = RULES[rule]
    column = frame[spec.column]
    worst = (column.min() if spec.bound == "min_value" else column.max()) if len(column) else None
    offenders = [row[index[0]] for row in item.result.get("unexpected_index_list", [])] if index else []
    return Outcome(
        rule=rule,
        severity=getattr(settings.severity, rule),
        passed=bool(item.success),
        observed=None if worst is None else float(worst),
        threshold=float(spec.threshold(settings)),
        offenders=offenders,
    )
