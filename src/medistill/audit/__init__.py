"""Is a synthetic set safe to share? Near-copy screening against the real training set, membership inference, and the
canary audit (`canary`: an empirical lower bound on the ε a method spends)."""

from medistill.audit.membership import membership_audit, roc_summary
from medistill.audit.neighbours import CopyThresholds, find_neighbours, ssim_matrix
from medistill.audit.report import AuditConfig, audit, audit_markdown, run_audit, summarize_audit

__all__ = [
    "AuditConfig",
    "CopyThresholds",
    "audit",
    "audit_markdown",
    "find_neighbours",
    "membership_audit",
    "roc_summary",
    "run_audit",
    "ssim_matrix",
    "summarize_audit",
]
