"""Lessons: functions that exist only to check or demonstrate something in a notebook, each file named for what
it checks. The product code they exercise lives in the other layers; nothing there imports from here.
"""
