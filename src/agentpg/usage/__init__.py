"""What each database costs, and what happens when a user's databases cost more than its budget."""
