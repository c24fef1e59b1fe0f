"""The planner's widgets: inputs on the left, the budget and the savings ladder on the right."""
