"""Reading results files back: python -m pipeinfer.report (tables, plots) and
python -m pipeinfer.report.answers (a results file's chats and answers)."""
