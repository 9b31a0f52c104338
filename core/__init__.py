"""FLEX's ground floor, importable by every package: the error root, enrolment texts,
queue names and wei units. It imports no other FLEX package."""
