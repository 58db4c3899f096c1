"""The embedded story corpus: simple children's stories generated from a seed.

No text is downloaded or shipped. Stories follow a small grammar (characters, places, objects,
wishes, troubles, helpers, endings) with consistent names and pronouns inside a story, so a small
model can learn real structure and its validation loss falls well below the unigram entropy.
"""

from __future__ import annotations

import random

GIRLS = ["Lily", "Mia", "Sue", "Anna", "Emma", "Lucy", "Kate", "Zoe", "Ella", "Rose", "Amy", "Jill",
         "Sara", "Nina", "Ruby", "Grace"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Tim", "Leo", "Jack", "Finn", "Jake", "Noah", "Bob", "Dan",
        "Alex", "Joe", "Luke", "Owen"]
ANIMALS = ["cat", "dog", "bird", "bunny", "frog", "duck", "bear", "fox", "mouse", "puppy", "kitten",
           "owl", "fish", "turtle", "horse", "lamb"]
PLACES = ["park", "forest", "garden", "beach", "farm", "hill", "river", "town", "school", "yard",
          "lake", "meadow", "zoo", "kitchen", "market"]
OBJECTS = ["ball", "kite", "box", "hat", "toy", "book", "cake", "flower", "shell", "drum", "boat",
           "apple", "cup", "rock", "car", "doll", "train", "balloon", "key", "sock"]
COLORS = ["red", "blue", "green", "yellow", "big", "little", "shiny", "soft", "pretty", "old", "new",
          "tiny", "bright", "pink"]
FEELINGS = ["happy", "sad", "scared", "excited", "tired", "proud", "angry", "surprised", "curious",
            "worried"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "snowy"]
ACTIONS = ["play", "run", "jump", "dance", "sing", "swim", "climb", "read", "draw", "bake", "hide",
           "explore"]


class _Story:
    def __init__(self, rng: random.Random):
        self.rng = rng
        girl = rng.random() < 0.5
        self.hero = rng.choice(GIRLS if girl else BOYS)
        self.he, self.his, self.him = ("she", "her", "her") if girl else ("he", "his", "him")
        self.friend = rng.choice([n for n in GIRLS + BOYS if n != self.hero])
        self.animal = rng.choice(ANIMALS)
        self.place = rng.choice(PLACES)
        self.thing = rng.choice(OBJECTS)
        self.color = rng.choice(COLORS)
        self.action = rng.choice(ACTIONS)

    def pick(self, *templates: str) -> str:
        text = self.rng.choice(templates)
        return text.format(
            hero=self.hero, he=self.he, He=self.he.capitalize(), his=self.his, him=self.him,
            friend=self.friend, animal=self.animal, place=self.place, thing=self.thing,
            color=self.color, action=self.action, feeling=self.rng.choice(FEELINGS),
            weather=self.rng.choice(WEATHER), other=self.rng.choice(OBJECTS),
        )


def story(rng: random.Random) -> str:
    s = _Story(rng)
    parts = [
        s.pick("Once upon a time, there was a little {animal} named {hero}.",
               "One {weather} day, {hero} went to the {place}.",
               "There was a {feeling} child named {hero} who lived near the {place}.",
               "{hero} had a {color} {thing} that {he} loved very much."),
        s.pick("{He} liked to {action} with {his} friend {friend}.",
               "Every day, {hero} and {friend} would {action} at the {place}.",
               "{hero} wanted to {action} all day long.",
               "{He} loved {his} {color} {thing} more than anything."),
    ]
    if rng.random() < 0.7:
        parts.append(s.pick(
            "One day, {hero} saw a {color} {thing} under a tree.",
            "But one day, the {thing} was lost and {hero} felt {feeling}.",
            "Then a big wind came and took the {thing} away.",
            "Suddenly, a {animal} ran to {hero} and took the {thing}.",
        ))
        parts.append(s.pick(
            "{hero} asked {friend}, \"Can you help me find my {thing}?\"",
            "{friend} said, \"Do not be {feeling}. I will help you.\"",
            "{He} looked in the {place} and behind the {other}.",
            "\"Where is my {thing}?\" {hero} asked the {animal}.",
        ))
        parts.append(s.pick(
            "At last, they found the {thing} near the {other}.",
            "The {animal} gave the {thing} back and said sorry.",
            "{friend} found the {thing} and gave it to {hero}.",
            "They looked and looked, and then {hero} saw the {thing} in the {place}.",
        ))
    for _ in range(rng.randint(1, 5)):
        parts.append(s.pick(
            "They went to {action} at the {place} together.",
            "The sun was {weather} and the sky was {color}.",
            "{hero} smiled and felt {feeling}.",
            "{friend} had a {color} {other} too.",
            "They shared the {other} and laughed.",
            "{He} said, \"Thank you, {friend}!\"",
        ))
    parts.append(s.pick(
        "From that day on, {hero} and {friend} were best friends.",
        "{hero} learned that it is good to share and help others.",
        "In the end, {hero} was very {feeling} and went home to sleep.",
        "And they played with the {thing} every day after that.",
        "The end.",
    ))
    return " ".join(parts)


def generate(n: int, seed: int) -> list[str]:
    """`n` stories, the same for the same seed on every machine."""
    rng = random.Random(seed)
    return [story(rng) for _ in range(n)]
