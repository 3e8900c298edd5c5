"""The dashboard: screenings, latency, review queue and throughput, index, erasure deadlines."""

from __future__ import annotations

from flask import Blueprint, render_template

from admin import runtime
from admin.dashboard.charts import stacked_bars
from admin.permissions import permission_required
from moderation.governance.dashboard import REVIEW_DECISIONS, SCREENING_DECISIONS, dashboard_stats
from moderation.modelops.gauges import model_health

bp = Blueprint("dashboard", __name__, url_prefix="/dashboard")


@bp.route("")
@permission_required("dashboard")
def index() -> str:
    with runtime().sessions() as db:
        stats = dashboard_stats(db, hours=24)
    return render_template(
        "dashboard/index.html",
        stats=stats,
        health=model_health(runtime()),
        screening_chart=stacked_bars(stats.screenings, SCREENING_DECISIONS),
        review_chart=stacked_bars(stats.reviews, REVIEW_DECISIONS),
    )
