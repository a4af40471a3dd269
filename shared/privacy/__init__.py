"""Differential-privacy accounting and the privacy ledger."""

from .accounting import (
    AccountingError,
    EpsilonReport,
    SampledGaussian,
    epsilon,
    epsilon_after,
    epsilon_checked,
    zcdp_rho,
)
from .ledger import BudgetExceeded, LedgerEntry, LedgerError, PrivacyLedger

__all__ = [
    "AccountingError",
    "EpsilonReport",
    "SampledGaussian",
    "epsilon",
    "epsilon_after",
    "epsilon_checked",
    "zcdp_rho",
    "BudgetExceeded",
    "LedgerEntry",
    "LedgerError",
    "PrivacyLedger",
]
