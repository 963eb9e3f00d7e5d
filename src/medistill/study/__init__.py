"""The feasibility study as a tool: a YAML grid of runs, executors (local, Ray), a results store,
the "distillation simulation" set builder, tables, correlation, the predictor and the report."""

from medistill.study.analysis import Cell, Correlation, LinearFit, cells_from_records, correlations
from medistill.study.executors import create_executor, list_executors, register_executor
from medistill.study.predict import Prediction, evaluate_predictor, fit_predictor, predict
from medistill.study.report import write_report
from medistill.study.runner import RunEnv, StudySummary, execute, run_study
from medistill.study.simulation import SimulationRecipe, build_simulation
from medistill.study.spec import RunSpec, StudySpec, Task, load_study, parse_study
from medistill.study.store import ResultStore

__all__ = [
    "Cell",
    "Correlation",
    "LinearFit",
    "Prediction",
    "ResultStore",
    "RunEnv",
    "RunSpec",
    "SimulationRecipe",
    "StudySpec",
    "StudySummary",
    "Task",
    "build_simulation",
    "cells_from_records",
    "correlations",
    "create_executor",
    "evaluate_predictor",
    "execute",
    "fit_predictor",
    "list_executors",
    "load_study",
    "parse_study",
    "predict",
    "register_executor",
    "run_study",
    "write_report",
]
